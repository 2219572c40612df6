// Usage: requests and tokens per tenant and per model, from the server's usage records.
import { get } from "../api";
import { BarChart } from "../components/charts";
import { Card, Empty, ErrorBanner, Loading, PageHeader, Table } from "../components/ui";
import { count } from "../format";
import { useApi } from "../hooks";

interface UsageRow {
  tenant?: string;
  model?: string;
  day?: string;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  avg_latency_ms: number;
}

function Breakdown(props: { by: "tenant" | "model"; rows: UsageRow[] }) {
  const rows = [...props.rows].sort((a, b) => b.prompt_tokens + b.completion_tokens - (a.prompt_tokens + a.completion_tokens));
  return (
    <Card title={`Tokens by ${props.by}`}>
      {rows.length === 0 ? (
        <Empty>No requests recorded yet.</Empty>
      ) : (
        <>
          <BarChart
            label={`Tokens by ${props.by}`}
            rows={rows.map((r) => ({ label: String(r[props.by]), value: r.prompt_tokens + r.completion_tokens }))}
            format={(v) => count(v)}
          />
          <Table
            head={
              <>
              <th>{props.by === "tenant" ? "Tenant" : "Model"}</th>
              <th class="num">Requests</th>
              <th class="num">Prompt</th>
              <th class="num">Completion</th>
              <th class="num hide-sm">Avg latency</th>

              </>
            }
          >
            {rows.map((r) => (
              <tr key={r[props.by]}>
                <td>{r[props.by]}</td>
                <td class="num">{count(r.requests)}</td>
                <td class="num">{count(r.prompt_tokens)}</td>
                <td class="num">{count(r.completion_tokens)}</td>
                <td class="num hide-sm">{Math.round(r.avg_latency_ms)} ms</td>
              </tr>
            ))}

          </Table>
        </>
      )}
    </Card>
  );
}

export function Usage() {
  const byTenant = useApi(() => get<{ data: UsageRow[] }>("/admin/usage?by=tenant"), [], 10000);
  const byModel = useApi(() => get<{ data: UsageRow[] }>("/admin/usage?by=model"), [], 10000);
  const byDay = useApi(() => get<{ data: UsageRow[] }>("/admin/usage?by=day"), [], 10000);
  if ((byTenant.loading && !byTenant.data) || (byModel.loading && !byModel.data)) return <Loading />;
  const days = (byDay.data?.data ?? []).slice(-14);
  return (
    <>
      <PageHeader title="Usage" subtitle="Requests and tokens recorded per tenant and model (all time)." />
      <ErrorBanner error={byTenant.error ?? byModel.error ?? byDay.error} what="Could not read usage" />
      <div class="grid two">
        <Breakdown by="tenant" rows={byTenant.data?.data ?? []} />
        <Breakdown by="model" rows={byModel.data?.data ?? []} />
      </div>
      <Card title="Tokens per day (last 14 days)">
        {days.length === 0 ? (
          <Empty>No requests recorded yet.</Empty>
        ) : (
          <BarChart label="Tokens per day" rows={days.map((d) => ({ label: String(d.day), value: d.prompt_tokens + d.completion_tokens }))} format={(v) => count(v)} />
        )}
      </Card>
    </>
  );
}
