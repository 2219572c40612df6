// Runtime: which models are resident, the memory they hold against the budget, the queue, and tokens per second.
import { useRef } from "preact/hooks";
import { get, post, type Runtime as RuntimeState } from "../api";
import { Badge, Card, Empty, ErrorBanner, Loading, Meter, PageHeader, Stat, Table, useAction } from "../components/ui";
import { bytes, seconds } from "../format";
import { useApi } from "../hooks";

const POLL_MS = 2000;

/** Tokens per second of each model, from the change of its token counters between two polls. */
function useRates(state: RuntimeState | null): Map<string, number> {
  const last = useRef<{ at: number; tokens: Map<string, number> } | null>(null);
  const rates = useRef(new Map<string, number>());
  const seen = useRef<RuntimeState | null>(null);
  if (state && state !== seen.current) {
    seen.current = state;
    const now = performance.now();
    const tokens = new Map(state.models.map((m) => [m.name, m.generated_tokens ?? 0]));
    if (last.current) {
      const elapsed = (now - last.current.at) / 1000;
      for (const [name, value] of tokens) {
        const before = last.current.tokens.get(name);
        rates.current.set(name, before === undefined || elapsed <= 0 ? 0 : Math.max(0, value - before) / elapsed);
      }
    }
    last.current = { at: now, tokens };
  }
  return rates.current;
}

export function Runtime() {
  const runtime = useApi(() => get<RuntimeState>("/admin/runtime"), [], POLL_MS);
  const action = useAction();
  const rates = useRates(runtime.data);
  if (runtime.loading && !runtime.data) return <Loading />;
  const r = runtime.data;
  const unload = (name: string) => action.run(() => post("/admin/runtime/unload", { model: name })).then(runtime.reload);
  const total = [...rates.values()].reduce((a, b) => a + b, 0);
  const running = r?.models.reduce((a, m) => a + (m.running ?? 0), 0) ?? 0;
  const waiting = r?.models.reduce((a, m) => a + (m.waiting ?? 0), 0) ?? 0;
  return (
    <>
      <PageHeader title="Runtime" subtitle="Resident models and the engine, refreshed every 2 seconds. Models load on first use and unload when idle." />
      <ErrorBanner error={runtime.error ?? action.error} what="Runtime" />
      {r && (
        <>
          <div class="grid stats">
            <Card>
              <Stat label="Model memory" value={`${bytes(r.used)} / ${bytes(r.budget)}`} hint={<Meter kind="capacity" value={r.used} max={r.budget} label="Memory used of budget" />} />
            </Card>
            <Card>
              <Stat label="Process memory (RSS)" value={bytes(r.rss)} />
            </Card>
            <Card>
              <Stat label="Sequences" value={`${running} running`} hint={`${waiting} waiting`} />
            </Card>
            <Card>
              <Stat label="Generation" value={`${total.toFixed(1)} tok/s`} hint={`${r.models.length} resident model${r.models.length === 1 ? "" : "s"}`} />
            </Card>
          </div>
          <Card title="Resident models">
            {r.models.length === 0 ? (
              <Empty>No model is loaded. The first request for a model loads it.</Empty>
            ) : (
              <Table testId="resident-models"
                head={
                  <>
                  <th>Model</th>
                  <th>Backend</th>
                  <th class="num">Memory</th>
                  <th class="num hide-sm">In flight</th>
                  <th class="hide-sm">KV cache</th>
                  <th class="num hide-sm">tok/s</th>
                  <th class="hide-sm">Unloads in</th>
                  <th>
                    <span class="sr-only">Actions</span>
                  </th>

                  </>
                }
              >
                {r.models.map((m) => (
                  <tr key={m.name}>
                    <td>
                      <a href={`#/models/${encodeURIComponent(m.name)}`}>{m.name}</a>
                      {m.pinned && <Badge tone="violet">pinned</Badge>}
                    </td>
                    <td>
                      <Badge tone="blue">{m.backend}</Badge>
                    </td>
                    <td class="num">{bytes(m.memory)}</td>
                    <td class="num hide-sm">
                      {m.in_flight}
                      {m.waiting ? <span class="muted"> (+{m.waiting} queued)</span> : null}
                    </td>
                    <td class="hide-sm">
                      {m.kv_cells_total ? <Meter kind="capacity" value={m.kv_cells_used ?? 0} max={m.kv_cells_total} label={`${m.name} KV cache use`} /> : "–"}
                    </td>
                    <td class="num hide-sm">{(rates.get(m.name) ?? 0).toFixed(1)}</td>
                    <td class="hide-sm">{m.pinned ? "never" : m.expires_at ? seconds(m.expires_at - Date.now() / 1000) : "when idle"}</td>
                    <td>
                      <button type="button" class="ghost small" onClick={() => unload(m.name)} aria-label={`Unload ${m.name}`}>
                        Unload
                      </button>
                    </td>
                  </tr>
                ))}

              </Table>
            )}
          </Card>
        </>
      )}
    </>
  );
}
