"""Prompt material of the conversation and speculative-decoding benchmarks.

Contract: plain data and pure functions, no I/O. :func:`system_prompt` renders a realistic support-assistant system
prompt of about 900 SmolLM2 tokens (policies plus tool descriptions, as chat apps and agents send with every
request) for one of :data:`PRODUCTS`; variants differ from their first sentence on, so two of them share no prefix.
:data:`SCENARIOS` are six-message customer conversations, :data:`QUESTIONS` sixteen different opening questions
for one shared system prompt, :data:`PASSAGES` and :data:`COPY_TASKS` make prompts whose answer repeats or lightly
edits text given in the prompt (what prompt-lookup drafting accelerates), :data:`CHAT_PROMPTS` ordinary questions.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Product:
    company: str
    product: str
    assistant: str
    return_days: int
    warranty_years: int
    hours: str
    region: str


PRODUCTS = [
    Product("Northwind Home", "Northwind Aura smart thermostat", "Wren", 30, 2, "8:00-20:00 CET", "the EU"),
    Product("Bluepeak Audio", "Bluepeak Drift wireless headphones", "Echo", 45, 1, "9:00-18:00 EST", "North America"),
    Product("Kestrel Cycles", "Kestrel Volt e-bike", "Milo", 14, 3, "7:00-19:00 GMT", "the UK"),
    Product("Lumen Labs", "Lumen Halo desk lamp", "Iris", 60, 5, "10:00-22:00 JST", "Japan"),
    Product("Orchard Kitchen", "Orchard Press cold juicer", "Sage", 30, 2, "8:00-17:00 AEST", "Australia"),
]

_SYSTEM_TEMPLATE = """\
You are {assistant}, the customer support assistant of {company}, answering questions about the {product} and \
orders placed in our online store. You speak for {company}: be friendly, concise and accurate. Never invent \
order details, prices, delivery dates or policy terms; look them up with the tools below or say that you will \
ask a human colleague. Answer in the customer's language. Keep answers under 120 words unless the customer asks \
for step-by-step instructions.

## Who you are talking to
Customers reach you from our website and mobile app. Never ask for their password or payment details. If a \
customer is not logged in, you may answer general questions, but before you look up or change an order you must \
verify their identity with the verify_customer tool (email address plus order number).

## Orders and delivery
Orders ship from our warehouse within two business days. Standard delivery in {region} takes three to five \
business days after dispatch; express delivery takes one to two. A tracking link is emailed when the parcel \
leaves the warehouse. If tracking has not changed for five business days, open a carrier investigation with the \
open_ticket tool (category "delivery") and tell the customer we will update them within 48 hours. An order can \
be changed or cancelled free of charge until it is dispatched; after that it must be returned.

## Returns and refunds
Customers may return the {product} within {return_days} days of delivery for a full refund, provided it is \
complete and undamaged. Opened items are accepted; items damaged by misuse are not. Create the return with the \
create_return tool; it emails a prepaid label. Refunds go back to the original payment method within five \
business days after the warehouse receives the item. Shipping costs of the original order are refunded only if \
the item was faulty or we made a mistake. Never promise a refund before the return is created.

## Warranty and repairs
The {product} has a {warranty_years}-year limited warranty from the date of delivery. It covers manufacturing \
defects, not wear, accidents, liquid damage or unauthorised repairs. Before you open a warranty claim, walk the \
customer through the basic troubleshooting steps from the knowledge base (search_kb tool): restart the device, \
update the firmware, check power and connections, and reset to factory settings as a last resort. If the fault \
remains, open a ticket with category "warranty" and ask the customer for the serial number, which is printed on \
the underside of the device and shown in the app under Settings > About.

## Safety
If a customer mentions smoke, a burning smell, sparks, swelling batteries or an injury, tell them to stop using \
the device at once, unplug it if it is safe to do so, and keep it away from flammable materials. Then open a \
ticket with category "safety" and priority "urgent". Do not troubleshoot safety issues.

## Escalation
Hand the conversation to a human colleague (escalate tool) when the customer asks for one, when they are upset \
after two attempts to help, for legal threats, press enquiries, business or bulk orders, and for anything this \
policy does not cover. Human support is available {hours}, Monday to Friday; outside those hours, tell the \
customer when they can expect an answer.

## Tools
You can call these tools by answering with a JSON object {{"tool": NAME, "arguments": {{...}}}} and nothing else. \
The tool result arrives in the next message.
- lookup_order(order_number: string) -> status, items, dispatch date, tracking link, delivery address (city only).
- verify_customer(email: string, order_number: string) -> verified: boolean.
- create_return(order_number: string, items: list of strings, reason: string) -> return id and label link.
- open_ticket(category: "delivery" | "warranty" | "safety" | "billing" | "other", summary: string, priority: \
"normal" | "urgent") -> ticket id.
- search_kb(query: string) -> up to three knowledge-base articles with titles and steps.
- escalate(reason: string) -> queue position and expected wait.
"""


def system_prompt(index: int) -> str:
    """The system prompt of product ``index`` (modulo the number of products)."""
    product = PRODUCTS[index % len(PRODUCTS)]
    return _SYSTEM_TEMPLATE.format(**product.__dict__)


SCENARIOS: list[list[str]] = [
    [
        "Hi, I ordered on Monday and my order {order} still says processing. When will it ship?",
        "OK. Can I still change the delivery address? I moved last week.",
        "The new address is 14 Harbour Street, flat 3. Is express delivery possible?",
        "How much more does express cost, roughly?",
        "Fine, please keep standard then. Will I get a tracking link by email?",
        "Great, thanks. One last thing: can I return it if I don't like it?",
    ],
    [
        "Hello, my device stopped turning on this morning. Order {order}.",
        "Yes, I tried restarting it and it's plugged in. The light doesn't come on at all.",
        "The app says the firmware is up to date. What else can I try?",
        "I did the factory reset and it still does nothing. Is it covered by the warranty?",
        "The serial number is SN-{order}-B. What happens next?",
        "How long does a warranty repair usually take?",
    ],
    [
        "I'd like to return my purchase, order {order}. It's not what I expected.",
        "I opened the box and used it twice. Is that a problem?",
        "Do I have to pay for the return shipping?",
        "And the original shipping cost, do I get that back too?",
        "OK, please create the return. It's just the one item.",
        "When will I see the money back on my card?",
    ],
    [
        "Hi! Is there a discount if I buy ten of these for my office? Order {order} was my first one.",
        "We are a small company with about forty employees.",
        "Can someone send us a quote by email?",
        "What are your support hours, in case I want to call?",
        "Do business orders have the same warranty?",
        "Thanks. Please pass my request on to the right team.",
    ],
    [
        "My parcel for order {order} hasn't moved in the tracking for a week.",
        "The last update says it arrived at the local depot.",
        "Can you open an investigation with the carrier?",
        "What if it turns out to be lost?",
        "Would you send a replacement or a refund?",
        "I'd prefer a replacement. Can it be sent express?",
    ],
]

QUESTIONS = [
    "How long does standard delivery take?",
    "Can I cancel an order that has not shipped yet?",
    "What does the warranty cover?",
    "My device makes a buzzing noise. What should I do?",
    "Where do I find the serial number?",
    "How do I update the firmware?",
    "Do you refund the shipping costs when I return something?",
    "Can I change my delivery address after ordering?",
    "Is express delivery available to my region?",
    "The battery looks swollen. Is that dangerous?",
    "How do I reset the device to factory settings?",
    "When will my refund arrive?",
    "Can I talk to a human, please?",
    "Do you offer discounts for bulk orders?",
    "My tracking link does not work. Can you help?",
    "Is an opened item still returnable?",
]

PASSAGES = [
    "The old lighthouse stood at the end of a narrow spit of rock, where the sea met the sky in a thin grey line. "
    "For more than a century its lamp had turned every night, throwing a beam across the water to warn ships of "
    "the reef hidden below the waves. The keeper, a quiet man named Tobias, climbed the spiral stairs each evening "
    "at dusk. He cleaned the great lens with a soft cloth, trimmed the wick and wound the clockwork that turned the "
    "light. In winter the storms came in from the west, and the whole tower shook with the wind. Tobias kept a "
    "logbook in which he wrote the weather, the ships that passed and the birds that rested on the gallery rail. "
    "When the lighthouse was finally automated, he gave the logbook to the town museum, where it can still be read "
    "today.",
    "To reset the router, first make sure it is switched on and connected to power. Locate the small reset button "
    "on the back panel, next to the network ports. Using a straightened paper clip, press and hold the button for "
    "about ten seconds, until the status light on the front starts to flash orange. Release the button and wait "
    "two to three minutes while the router restarts. When the status light turns solid green, the router has been "
    "restored to its factory settings. You can now connect to the default wireless network, whose name and "
    "password are printed on the label on the underside of the router. Open a web browser, go to the setup page "
    "and follow the instructions to choose a new network name and a strong password. Remember that all previous "
    "settings, including port forwarding rules and parental controls, will have to be configured again.",
    "Bees are among the most important pollinators on the planet. As they move from flower to flower collecting "
    "nectar and pollen, they carry pollen grains that fertilise plants and allow them to produce fruit and seeds. "
    "About one third of the food that people eat depends on pollination by bees and other insects, including "
    "apples, almonds, tomatoes and coffee. A single honeybee colony can contain tens of thousands of workers, a "
    "few hundred drones and one queen, who may lay more than a thousand eggs a day in summer. In recent decades, "
    "bee populations in many regions have declined because of habitat loss, pesticides, parasites and climate "
    "change. Farmers, gardeners and city councils can help by planting a variety of flowering plants, reducing "
    "the use of pesticides and leaving some areas of land wild.",
    "Dear Ms Patel, thank you for your letter of 3 March about the noise from the construction site on Mill Lane. "
    "We have spoken to the contractor, who has agreed that no heavy machinery will be used before eight o'clock in "
    "the morning or after six o'clock in the evening on weekdays, and that no work at all will take place on "
    "Sundays. The contractor will also install acoustic barriers along the northern edge of the site by the end of "
    "this month. Our environmental health officer will visit the site twice a week to check that these conditions "
    "are respected. If you continue to experience noise outside the permitted hours, please call our out-of-hours "
    "line and give the date and time, so that we can take further action. Yours sincerely, Daniel Moreau, "
    "Neighbourhood Services.",
]

COPY_TASKS = [
    "Repeat the following passage exactly, word for word, without any comment.\n\n{passage}",
    'Quote the following text in full, between quotation marks.\n\n"{passage}"',
    "Rewrite the following passage in the past tense where possible, changing nothing else.\n\n{passage}",
    "Copy the following passage and replace every full stop at the end of a sentence with an exclamation mark."
    "\n\n{passage}",
]

CHAT_PROMPTS = [
    "Explain in a few paragraphs why the sky is blue.",
    "Give me five practical tips for learning a new language as an adult.",
    "What are the benefits of regular exercise for mental health?",
    "Describe how a bicycle's gears work.",
    "Write a short guide to making a good cup of tea.",
    "What should I consider when adopting a dog?",
    "Explain the difference between weather and climate.",
    "How do vaccines train the immune system?",
]
