// Datasets: every stored version with its shape and splits, and a preview of the rows of the one selected.
import { get } from "../api";
import { Badge, Card, Empty, ErrorBanner, KeyValues, Loading, PageHeader, Table } from "../components/ui";
import { bytes, count, when } from "../format";
import { useApi } from "../hooks";

interface Dataset {
  name: string;
  repository: string;
  tags: string[];
  digest: string;
  size: number;
  created_at: string;
  details: { rows?: number; shape?: string; fields?: string[]; splits?: Record<string, number>; report?: Record<string, unknown> };
  lineage: { operation: string; parent_name: string | null }[];
}

const enc = encodeURIComponent;

function Preview(props: { dataset: Dataset; versions: Dataset[] }) {
  const d = props.dataset;
  const rows = useApi(() => get<{ data: Record<string, unknown>[] }>(`/admin/datasets/${enc(d.name)}/preview?rows=8`), [d.name]);
  const fields = d.details.fields ?? [...new Set((rows.data?.data ?? []).flatMap((r) => Object.keys(r)))];
  return (
    <>
      <Card title={d.name}>
        <KeyValues
          items={[
            ["Rows", count(d.details.rows)],
            ["Shape", <Badge tone="blue">{d.details.shape ?? "–"}</Badge>],
            ["Splits", Object.entries(d.details.splits ?? {}).map(([k, v]) => `${k} ${v}`).join(" · ") || "–"],
            ["Size", bytes(d.size)],
            ["Made by", d.lineage.map((l) => `${l.operation}${l.parent_name ? ` of ${l.parent_name}` : ""}`).join(", ") || "import"],
            ["Digest", <span class="mono small wrap">{d.digest}</span>],
          ]}
        />
      </Card>
      <Card title="Preview">
        <ErrorBanner error={rows.error} what="Could not read rows" />
        {rows.loading && !rows.data ? (
          <Loading />
        ) : (
          <Table class="preview"
            head={
              <>
              {fields.map((f) => (
                <th key={f}>{f}</th>
              ))}

              </>
            }
          >
            {(rows.data?.data ?? []).map((row, i) => (
              <tr key={i}>
                {fields.map((f) => (
                  <td key={f} class="cell-text">
                    {typeof row[f] === "string" ? (row[f] as string) : JSON.stringify(row[f] ?? "")}
                  </td>
                ))}
              </tr>
            ))}

          </Table>
        )}
      </Card>
      <Card title="Versions">
        <ul class="versions">
          {props.versions.map((v) => (
            <li key={v.name}>
              <a href={`#/datasets/${enc(v.name)}`} aria-current={v.name === d.name ? "true" : undefined}>
                {v.name}
              </a>{" "}
              <span class="muted">
                {count(v.details.rows)} rows · {when(v.created_at)} · <span class="mono">{v.digest.slice(7, 19)}</span>
              </span>
            </li>
          ))}
        </ul>
      </Card>
    </>
  );
}

export function Datasets(props: { selected: string | null }) {
  const list = useApi(() => get<{ data: Dataset[] }>("/admin/datasets"), []);
  const all = list.data?.data ?? [];
  const selected = all.find((d) => d.name === props.selected) ?? null;
  return (
    <>
      <PageHeader title="Datasets" subtitle="Versioned training and evaluation data. Import with llmos data import." />
      <ErrorBanner error={list.error} what="Could not list datasets" />
      {list.loading && !list.data ? (
        <Loading />
      ) : all.length === 0 ? (
        <Empty>
          No datasets yet. Import one with <code>llmos data import FILE --name NAME</code>.
        </Empty>
      ) : (
        <div class="grid sidebar-left">
          <Card title="All datasets">
            <ul class="list-nav">
              {all.map((d) => (
                <li key={d.name}>
                  <a href={`#/datasets/${enc(d.name)}`} aria-current={d.name === props.selected ? "page" : undefined}>
                    <span>{d.name}</span>
                    <span class="muted small">
                      {count(d.details.rows)} rows · {d.details.shape ?? ""}
                    </span>
                  </a>
                </li>
              ))}
            </ul>
          </Card>
          <div>
            {selected ? (
              <Preview dataset={selected} versions={all.filter((d) => d.repository === selected.repository)} />
            ) : (
              <Empty>Choose a dataset to preview its rows.</Empty>
            )}
          </div>
        </div>
      )}
    </>
  );
}
