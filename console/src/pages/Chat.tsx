// The chat playground: pick a model and parameters, stream answers, and see tokens per second.
import { useEffect, useRef, useState } from "preact/hooks";
import { get, streamChat, tokensPerSecond, type ChatMessage, type ModelInfo, type StreamStats } from "../api";
import { Card, ErrorBanner, PageHeader } from "../components/ui";
import { seconds } from "../format";
import { useApi } from "../hooks";

interface Turn extends ChatMessage {
  stats?: StreamStats;
}

export function Chat(props: { initialModel: string | null }) {
  const models = useApi(() => get<{ data: ModelInfo[] }>("/admin/models"), []);
  const [model, setModel] = useState(props.initialModel ?? "");
  const [system, setSystem] = useState("You are a helpful assistant.");
  const [temperature, setTemperature] = useState(0.7);
  const [maxTokens, setMaxTokens] = useState(256);
  const [turns, setTurns] = useState<Turn[]>([]);
  const [input, setInput] = useState("");
  const [error, setError] = useState<Error | null>(null);
  const [busy, setBusy] = useState(false);
  const abort = useRef<AbortController | null>(null);
  const transcript = useRef<HTMLDivElement>(null);

  useEffect(() => {
    const names = (models.data?.data ?? []).map((m) => m.name);
    if (!model && names.length > 0) setModel(names.find((n) => n.startsWith("smollm2")) ?? names[0]);
  }, [models.data]);
  useEffect(() => {
    transcript.current?.scrollTo({ top: transcript.current.scrollHeight });
  }, [turns]);
  useEffect(() => () => abort.current?.abort(), []);

  const send = async (event?: Event) => {
    event?.preventDefault();
    const text = input.trim();
    if (!text || busy || !model) return;
    const history: Turn[] = [...turns, { role: "user", content: text }];
    setTurns([...history, { role: "assistant", content: "" }]);
    setInput("");
    setError(null);
    setBusy(true);
    abort.current = new AbortController();
    const messages: ChatMessage[] = [
      ...(system.trim() ? [{ role: "system" as const, content: system.trim() }] : []),
      ...history.map(({ role, content }) => ({ role, content })),
    ];
    let answer = "";
    try {
      const stats = await streamChat(
        { model, messages, temperature, max_tokens: maxTokens },
        (piece) => {
          answer += piece;
          setTurns([...history, { role: "assistant", content: answer }]);
        },
        abort.current.signal,
      );
      setTurns([...history, { role: "assistant", content: answer, stats }]);
    } catch (exc) {
      if ((exc as Error).name !== "AbortError") setError(exc as Error);
      setTurns([...history, { role: "assistant", content: answer }]);
    } finally {
      setBusy(false);
      abort.current = null;
    }
  };

  const keydown = (event: KeyboardEvent) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  };

  return (
    <>
      <PageHeader title="Playground" subtitle="Chat with any model through the OpenAI-compatible API; answers stream as they are generated." />
      <div class="chat-layout">
        <Card class="chat-settings" title="Settings">
          <label for="chat-model">Model</label>
          <select id="chat-model" value={model} onChange={(e) => setModel((e.target as HTMLSelectElement).value)}>
            {!model && <option value="">Choose a model…</option>}
            {(models.data?.data ?? []).map((m) => (
              <option key={m.name} value={m.name}>
                {m.name}
              </option>
            ))}
          </select>
          <label for="chat-system">System prompt</label>
          <textarea id="chat-system" rows={3} value={system} onInput={(e) => setSystem((e.target as HTMLTextAreaElement).value)} />
          <label for="chat-temperature">
            Temperature <span class="muted">{temperature.toFixed(2)}</span>
          </label>
          <input
            id="chat-temperature"
            type="range"
            min={0}
            max={2}
            step={0.05}
            value={temperature}
            onInput={(e) => setTemperature(Number((e.target as HTMLInputElement).value))}
          />
          <label for="chat-max-tokens">Max tokens</label>
          <input
            id="chat-max-tokens"
            type="number"
            min={1}
            max={4096}
            value={maxTokens}
            onInput={(e) => setMaxTokens(Math.max(1, Number((e.target as HTMLInputElement).value) || 1))}
          />
          <button type="button" class="ghost" onClick={() => setTurns([])} disabled={busy || turns.length === 0}>
            Clear conversation
          </button>
        </Card>
        <Card class="chat-main">
          <ErrorBanner error={models.error ?? error} what="The request failed" />
          <div class="transcript" ref={transcript} aria-live="polite" aria-label="Conversation">
            {turns.length === 0 && <p class="muted center">Ask something — for example “What is the capital of France?”</p>}
            {turns.map((turn, index) => (
              <div key={index} class={`message ${turn.role}`}>
                <div class="role">{turn.role === "user" ? "You" : model}</div>
                <div class="content">{turn.content || (busy && index === turns.length - 1 ? "…" : "")}</div>
                {turn.stats && (
                  <div class="message-stats" data-testid="stream-stats">
                    {turn.stats.completionTokens} tokens ·{" "}
                    <strong>{tokensPerSecond(turn.stats)?.toFixed(1) ?? "–"} tok/s</strong>{" "}
                    · first token {seconds(turn.stats.firstTokenSeconds)} · {turn.stats.finishReason}
                  </div>
                )}
              </div>
            ))}
          </div>
          <form class="composer" onSubmit={send}>
            <label for="chat-input" class="sr-only">
              Message
            </label>
            <textarea
              id="chat-input"
              rows={2}
              placeholder="Message (Enter to send, Shift+Enter for a new line)"
              value={input}
              onInput={(e) => setInput((e.target as HTMLTextAreaElement).value)}
              onKeyDown={keydown}
            />
            {busy ? (
              <button type="button" class="danger" onClick={() => abort.current?.abort()}>
                Stop
              </button>
            ) : (
              <button type="submit" class="primary" disabled={!input.trim() || !model}>
                Send
              </button>
            )}
          </form>
        </Card>
      </div>
    </>
  );
}
