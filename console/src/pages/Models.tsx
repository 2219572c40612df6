// Models: the registry's tags with size and format; a model's page adds lineage, reports, tagging and deletion.
import { useState } from "preact/hooks";
import { del, get, post, type ModelDetails, type ModelInfo } from "../api";
import { LineageGraph } from "../components/charts";
import { Badge, Card, Empty, ErrorBanner, KeyValues, Loading, PageHeader, Table, useAction } from "../components/ui";
import { bytes, count, metric, when } from "../format";
import { navigate, useApi } from "../hooks";
import { atLeast, useSession } from "../session";

const enc = encodeURIComponent;

export function Models() {
  const models = useApi(() => get<{ data: ModelInfo[] }>("/admin/models"), []);
  const [filter, setFilter] = useState("");
  const rows = (models.data?.data ?? []).filter((m) => m.name.toLowerCase().includes(filter.toLowerCase()));
  return (
    <>
      <PageHeader
        title="Models"
        subtitle="Every model version this key may use. Pull more with llmos pull."
        actions={
          <input
            type="search"
            aria-label="Filter models"
            placeholder="Filter…"
            value={filter}
            onInput={(e) => setFilter((e.target as HTMLInputElement).value)}
          />
        }
      />
      <ErrorBanner error={models.error} what="Could not list models" />
      {models.loading && !models.data ? (
        <Loading />
      ) : rows.length === 0 ? (
        <Empty>No models{filter ? " match" : " yet"}.</Empty>
      ) : (
        <Card>
          <Table
            head={
              <>
              <th>Name</th>
              <th>Format</th>
              <th class="hide-sm">Quantization</th>
              <th class="num hide-sm">Parameters</th>
              <th class="num">Size</th>
              <th class="hide-sm">Created</th>

              </>
            }
          >
            {rows.map((m) => (
              <tr key={m.name}>
                <td>
                  <a href={`#/models/${enc(m.name)}`}>{m.name}</a>
                  <div class="muted mono small">{m.short_digest}</div>
                </td>
                <td>
                  <Badge tone={m.format === "gguf" ? "blue" : m.format === "lora" ? "violet" : "gray"}>{m.format}</Badge>
                </td>
                <td class="hide-sm">{m.quantization ?? "–"}</td>
                <td class="num hide-sm">{count(m.parameter_count)}</td>
                <td class="num">{bytes(m.size)}</td>
                <td class="hide-sm">{when(m.created_at)}</td>
              </tr>
            ))}

          </Table>
        </Card>
      )}
    </>
  );
}

function TagForm(props: { source: string; onDone: () => void }) {
  const [target, setTarget] = useState("");
  const { error, run } = useAction();
  const [done, setDone] = useState<string | null>(null);
  const submit = (event: Event) => {
    event.preventDefault();
    run(async () => {
      const tagged = await post<ModelInfo>("/admin/models/tag", { source: props.source, target: target.trim() });
      setDone(tagged.name);
      setTarget("");
      props.onDone();
    });
  };
  return (
    <form class="inline-form" onSubmit={submit}>
      <label for="tag-target">New tag or alias</label>
      <div class="row">
        <input id="tag-target" required placeholder="name:prod" value={target} onInput={(e) => setTarget((e.target as HTMLInputElement).value)} />
        <button type="submit" class="primary" disabled={!target.trim()}>
          Tag
        </button>
      </div>
      <ErrorBanner error={error} what="Tagging failed" />
      {done && (
        <p class="ok" role="status">
          Tagged as <a href={`#/models/${enc(done)}`}>{done}</a>.
        </p>
      )}
    </form>
  );
}

function CompressionReport(props: { report: Record<string, unknown> }) {
  const entries = Object.entries(props.report).filter(([, v]) => typeof v !== "object" || v === null);
  const nested = Object.entries(props.report).filter(([, v]) => typeof v === "object" && v !== null) as [string, Record<string, unknown>][];
  return (
    <>
      {entries.length > 0 && <KeyValues items={entries.map(([k, v]) => [k, metric(v)])} />}
      {nested.length > 0 && (
        <Table
          head={
            <>
            <th>Measure</th>
            {nested.map(([k]) => (
              <th key={k}>{k}</th>
            ))}

            </>
          }
        >
          {[...new Set(nested.flatMap(([, v]) => Object.keys(v)))].map((measure) => (
            <tr key={measure}>
              <td>{measure}</td>
              {nested.map(([k, v]) => (
                <td key={k} class="num">
                  {metric(v[measure])}
                </td>
              ))}
            </tr>
          ))}

        </Table>
      )}
    </>
  );
}

export function ModelDetail(props: { name: string }) {
  const { me } = useSession();
  const model = useApi(() => get<ModelDetails>(`/admin/models/${enc(props.name)}`), [props.name]);
  const deletion = useAction();
  const remove = () => {
    if (!window.confirm(`Delete ${props.name}? Its files are removed when no other tag uses them.`)) return;
    deletion.run(() => del(`/v1/models/${enc(props.name)}`)).then((ok) => ok && navigate("/models"));
  };
  if (model.loading && !model.data) return <Loading />;
  const m = model.data;
  if (!m) return <ErrorBanner error={model.error} what={`Could not load ${props.name}`} />;
  return (
    <>
      <PageHeader
        title={m.name}
        subtitle={
          <>
            <a href="#/models">Models</a> / <span class="mono">{m.short_digest}</span>
          </>
        }
        actions={
          <>
            <a class="button primary" href={`#/chat/${enc(m.name)}`}>
              Chat
            </a>
            {atLeast(me, "developer") && (
              <button type="button" class="danger" onClick={remove}>
                Delete
              </button>
            )}
          </>
        }
      />
      <ErrorBanner error={deletion.error} what="Delete failed" />
      <div class="grid two">
        <Card title="Details">
          <KeyValues
            items={[
              ["Format", <Badge tone="blue">{m.format}</Badge>],
              ["Architecture", m.architecture ?? "–"],
              ["Parameters", count(m.parameter_count)],
              ["Quantization", m.quantization ?? "–"],
              ["Context length", count(m.context_length)],
              ["Size", bytes(m.size)],
              ["Tags", m.tags.map((t) => <Badge key={t}>{t}</Badge>)],
              ["Created", when(m.created_at)],
              ["Digest", <span class="mono small wrap">{m.digest}</span>],
            ]}
          />
        </Card>
        <Card title="Files">
          <ul class="files">
            {m.files.map((f) => (
              <li key={f.path}>
                <span class="mono">{f.path}</span> <span class="muted">{bytes(f.size)}</span>
              </li>
            ))}
          </ul>
          {me.role === "admin" && <TagForm source={m.name} onDone={model.reload} />}
        </Card>
      </div>
      <Card title="Lineage">
        {m.graph.edges.length === 0 ? (
          <Empty>{m.name} was imported; it has no parents in the registry.</Empty>
        ) : (
          <LineageGraph nodes={m.graph.nodes} edges={m.graph.edges} current={m.digest} />
        )}
      </Card>
      <div class="grid two">
        <Card title="Evaluations">
          {m.evaluations.length === 0 ? (
            <Empty>
              No reports yet. Run <code>llmos eval {m.name}</code> or start an eval job.
            </Empty>
          ) : (
            <Table
              head={
                <>
                <th>Task</th>
                <th>Dataset</th>
                <th>Metrics</th>
                <th>When</th>

                </>
              }
            >
              {m.evaluations.map((r) => (
                <tr key={r.id}>
                  <td>{r.task}</td>
                  <td>{r.dataset ?? "–"}</td>
                  <td class="small">
                    {Object.entries(r.metrics)
                      .filter(([, v]) => typeof v === "number")
                      .slice(0, 4)
                      .map(([k, v]) => `${k} ${metric(v)}`)
                      .join(" · ")}
                  </td>
                  <td>{when(r.created_at)}</td>
                </tr>
              ))}

            </Table>
          )}
        </Card>
        <Card title="Compression report">
          {m.compression ? <CompressionReport report={m.compression} /> : <Empty>Not a compressed model, or no report stored.</Empty>}
        </Card>
      </div>
    </>
  );
}
