"""Calibration text for activation-aware pruning (written for llmos; not the held-out evaluation text).

Contract: :data:`CALIBRATION_TEXTS` is a handful of short, varied English passages (explanation, instructions, a
story, a dialogue, a list, a bit of code) that structured pruning runs through the model once to measure how much
each MLP channel is used. It is deliberately disjoint from ``llmos.data.shipped``'s held-out text, so perplexity
measured on that text stays an honest held-out number.
"""

from __future__ import annotations

CALIBRATION_TEXTS = (
    "Rivers shape the land slowly. Over thousands of years, water carries sand and small stones downstream, cutting"
    " valleys into soft rock and leaving wide plains where the current slows. When a river reaches the sea, it drops"
    " what it carried and builds a delta, a fan of islands and channels that shifts with every flood. Farmers have"
    " settled on such plains for as long as there have been farms, because the soil is rich and water is close.",
    "To repot a houseplant, water it a day before so the roots hold together. Choose a pot one size larger with a"
    " hole in the bottom. Tip the plant out gently, loosen the outer roots with your fingers, and set it at the same"
    " depth as before. Fill the gaps with fresh soil, press lightly, and water until it drains. Keep it out of strong"
    " sun for a week while the roots settle.",
    "The night train was late again. Mara stood on the platform with her collar turned up, counting the lamps along"
    " the track. When the headlight finally appeared, it was smaller than she remembered, and the carriage that"
    " stopped in front of her was nearly empty. She chose a seat by the window, opened her notebook, and wrote the"
    " first line of the letter she had been putting off for a month.",
    "User: How many minutes are there in a day?\nAssistant: There are 24 hours in a day and 60 minutes in an hour,"
    " so a day has 24 x 60 = 1440 minutes.\nUser: And seconds?\nAssistant: Multiply by 60 again: 86,400 seconds."
    "\nUser: What is the largest planet in the solar system?\nAssistant: Jupiter. It is more than twice as massive"
    " as all the other planets combined.",
    "Things to check before a long bicycle ride: the tyres hold their pressure; the brakes stop the wheel firmly;"
    " the chain is clean and oiled; the lights work; you carry water, a spare inner tube, a pump and a small tool."
    " Tell someone your route and when you expect to be back. Eat something before you start and every hour after.",
    'def average(values):\n    """Return the mean of a list of numbers, or None when it is empty."""\n'
    "    if not values:\n        return None\n    return sum(values) / len(values)\n\n\nprint(average([3, 4, 8]))"
    "  # prints 5.0\n",
    "Markets set prices through many small decisions. When a harvest is poor, buyers compete for what is left and"
    " the price rises; higher prices encourage farmers to plant more the next season, and the price falls again."
    " Economists call this a feedback loop. It does not always settle quickly: crops take a year to grow, so prices"
    " can swing up and down for several seasons before they find a steady level.",
    "Light from the Sun takes about eight minutes to reach the Earth. White sunlight is a mixture of colours, and"
    " the air scatters blue light more than red, which is why the sky looks blue at noon and the Sun looks orange"
    " near the horizon, when its light passes through much more air before it reaches our eyes.",
    "Dear Sam, thank you for the books you sent. The one about old maps was my favourite; I read it in two evenings."
    " The garden is doing well this year, except for the tomatoes, which the birds found before I did. Come and"
    " visit in the autumn if you can. We will walk up the hill and have lunch by the lake. Best wishes, Ana.",
    "A recipe for a simple soup: fry a chopped onion in a little oil until soft, add two sliced carrots, one potato"
    " cut into cubes and a litre of stock. Simmer for twenty minutes, season with salt and pepper, and blend until"
    " smooth. Serve with bread. The soup keeps for three days in the fridge and freezes well.",
)
