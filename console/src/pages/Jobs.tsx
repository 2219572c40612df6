// Jobs: training and evaluation runs with live progress; a job's page has its loss curve, log, cancel and resume.
import type { ComponentChildren } from "preact";
import { useState } from "preact/hooks";
import { get, post, type Job, type ModelInfo } from "../api";
import { LineChart, type Series } from "../components/charts";
import { Card, Empty, ErrorBanner, KeyValues, Loading, Meter, PageHeader, StateBadge, Table, useAction } from "../components/ui";
import { metric, seconds, when } from "../format";
import { navigate, useApi } from "../hooks";

const ACTIVE = new Set(["queued", "running"]);

function Progress(props: { job: Job }) {
  const { step, total } = props.job.progress;
  if (!total) return <span class="muted">{ACTIVE.has(props.job.state) ? "starting…" : "–"}</span>;
  return (
    <div class="progress-cell">
      <Meter kind="progress" value={step ?? 0} max={total} label={`${props.job.id} progress`} />
      <span class="small muted">
        {step ?? 0}/{total}
      </span>
    </div>
  );
}

function jobTitle(job: Job): string {
  const p = job.params;
  if (job.kind === "train") return `${p.method ?? "lora"} ${p.base} → ${p.name}`;
  if (job.kind === "eval") return `${p.task ?? "perplexity"} of ${p.model}`;
  return String(p.name ?? p.model ?? "");
}

function NewJob(props: { onCreated: (job: Job) => void }) {
  const models = useApi(() => get<{ data: ModelInfo[] }>("/admin/models"), []);
  const datasets = useApi(() => get<{ data: { name: string }[] }>("/admin/datasets"), []);
  const [kind, setKind] = useState<"train" | "eval">("eval");
  const [model, setModel] = useState("");
  const [data, setData] = useState("");
  const [name, setName] = useState("");
  const [steps, setSteps] = useState(20);
  const [task, setTask] = useState("perplexity");
  const [limit, setLimit] = useState(20);
  const { error, busy, run } = useAction();
  const modelNames = (models.data?.data ?? []).map((m) => m.name);
  const datasetNames = (datasets.data?.data ?? []).map((d) => d.name);
  const chosenModel = model || modelNames[0] || "";
  const chosenData = data || datasetNames[0] || "";
  const submit = (event: Event) => {
    event.preventDefault();
    const body =
      kind === "train"
        ? { kind, base: chosenModel, data: chosenData, name: name.trim() || `${chosenModel.split(":")[0]}-tuned`, max_steps: steps, batch_size: 4 }
        : { kind, model: chosenModel, task, data: chosenData || undefined, limit };
    run(async () => props.onCreated(await post<Job>("/admin/jobs", body)));
  };
  return (
    <Card title="New job">
      <form class="form-grid" onSubmit={submit}>
        <fieldset class="segmented">
          <legend>Kind</legend>
          {(["eval", "train"] as const).map((k) => (
            <label key={k}>
              <input type="radio" name="job-kind" value={k} checked={kind === k} onChange={() => setKind(k)} />
              {k === "eval" ? "Evaluate" : "Fine-tune (LoRA)"}
            </label>
          ))}
        </fieldset>
        <div>
          <label for="job-model">{kind === "train" ? "Base model" : "Model"}</label>
          <select id="job-model" value={chosenModel} onChange={(e) => setModel((e.target as HTMLSelectElement).value)}>
            {modelNames.map((n) => (
              <option key={n}>{n}</option>
            ))}
          </select>
        </div>
        <div>
          <label for="job-data">Dataset</label>
          <select id="job-data" value={chosenData} onChange={(e) => setData((e.target as HTMLSelectElement).value)}>
            {datasetNames.map((n) => (
              <option key={n}>{n}</option>
            ))}
          </select>
        </div>
        {kind === "train" ? (
          <>
            <div>
              <label for="job-name">New model name</label>
              <input id="job-name" placeholder={`${chosenModel.split(":")[0]}-tuned`} value={name} onInput={(e) => setName((e.target as HTMLInputElement).value)} />
            </div>
            <div>
              <label for="job-steps">Steps</label>
              <input id="job-steps" type="number" min={1} max={100000} value={steps} onInput={(e) => setSteps(Number((e.target as HTMLInputElement).value) || 1)} />
            </div>
          </>
        ) : (
          <>
            <div>
              <label for="job-task">Task</label>
              <select id="job-task" value={task} onChange={(e) => setTask((e.target as HTMLSelectElement).value)}>
                {["perplexity", "bleu", "rouge", "exact_match", "multiple_choice"].map((t) => (
                  <option key={t}>{t}</option>
                ))}
              </select>
            </div>
            <div>
              <label for="job-limit">Examples</label>
              <input id="job-limit" type="number" min={1} max={100000} value={limit} onInput={(e) => setLimit(Number((e.target as HTMLInputElement).value) || 1)} />
            </div>
          </>
        )}
        <div class="form-actions">
          <button type="submit" class="primary" disabled={busy || !chosenModel || (kind === "train" && !chosenData)}>
            {busy ? "Starting…" : "Start job"}
          </button>
        </div>
      </form>
      <ErrorBanner error={error} what="The job was not started" />
    </Card>
  );
}

export function Jobs() {
  const jobs = useApi(() => get<{ data: Job[] }>("/admin/jobs"), [], 2000);
  const [creating, setCreating] = useState(false);
  const all = jobs.data?.data ?? [];
  return (
    <>
      <PageHeader
        title="Jobs"
        subtitle="Training, evaluation and compression runs. They survive a crash and resume from their last checkpoint."
        actions={
          <button type="button" class="primary" onClick={() => setCreating(!creating)} aria-expanded={creating}>
            {creating ? "Close" : "New job"}
          </button>
        }
      />
      {creating && <NewJob onCreated={(job) => navigate(`/jobs/${job.id}`)} />}
      <ErrorBanner error={jobs.error} what="Could not list jobs" />
      {jobs.loading && !jobs.data ? (
        <Loading />
      ) : all.length === 0 ? (
        <Empty>No jobs yet.</Empty>
      ) : (
        <Card>
          <Table
            head={
              <>
              <th>Job</th>
              <th>State</th>
              <th>Progress</th>
              <th class="hide-sm">Created</th>

              </>
            }
          >
            {all.map((job) => (
              <tr key={job.id}>
                <td>
                  <a href={`#/jobs/${job.id}`} class="mono">
                    {job.id}
                  </a>
                  <div class="small muted">
                    {job.kind}: {jobTitle(job)}
                  </div>
                </td>
                <td>
                  <StateBadge state={job.state} />
                </td>
                <td>
                  <Progress job={job} />
                </td>
                <td class="hide-sm">{when(job.created_at)}</td>
              </tr>
            ))}

          </Table>
        </Card>
      )}
    </>
  );
}

/** A job's result as rows: nested objects (metrics) flattened one level, a produced model linked to its page. */
function resultItems(result: Record<string, unknown>): [string, ComponentChildren][] {
  const items: [string, ComponentChildren][] = [];
  for (const [key, value] of Object.entries(result)) {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      for (const [inner, v] of Object.entries(value as Record<string, unknown>)) {
        if (v !== null && typeof v !== "object") items.push([`${key}.${inner}`.replace(/^metrics\./, ""), metric(v)]);
      }
    } else if (key === "model" && typeof value === "string") {
      items.push([key, <a href={`#/models/${encodeURIComponent(value)}`}>{value}</a>]);
    } else if (key === "digest" && typeof value === "string") {
      items.push([key, <span class="mono small">{value}</span>]);
    } else {
      items.push([key, metric(value)]);
    }
  }
  return items;
}

export function JobDetail(props: { id: string }) {
  const job = useApi(() => get<Job>(`/admin/jobs/${props.id}`), [props.id], 1500);
  const active = job.data ? ACTIVE.has(job.data.state) : true;
  const points = useApi(() => get<{ data: Record<string, number>[] }>(`/admin/jobs/${props.id}/metrics`), [props.id], active ? 2000 : 0);
  const log = useApi(() => get<string>(`/admin/jobs/${props.id}/logs`), [props.id], active ? 3000 : 0);
  const action = useAction();
  const act = (what: "cancel" | "resume") => action.run(() => post(`/admin/jobs/${props.id}/${what}`)).then(job.reload);
  if (job.loading && !job.data) return <Loading />;
  const j = job.data;
  if (!j) return <ErrorBanner error={job.error} what={`Could not load job ${props.id}`} />;
  const records = points.data?.data ?? [];
  const series: Series[] = [];
  const loss = records.filter((r) => typeof r.loss === "number").map((r) => [r.step, r.loss] as [number, number]);
  const val = records.filter((r) => typeof r.val_loss === "number").map((r) => [r.step, r.val_loss] as [number, number]);
  if (loss.length) series.push({ name: "training loss", points: loss, tone: "blue" });
  if (val.length) series.push({ name: "validation loss", points: val, tone: "amber" });
  const { step, total, eta_seconds } = j.progress;
  return (
    <>
      <PageHeader
        title={`Job ${j.id}`}
        subtitle={
          <>
            <a href="#/jobs">Jobs</a> / {j.kind}: {jobTitle(j)}
          </>
        }
        actions={
          <>
            {ACTIVE.has(j.state) && (
              <button type="button" class="danger" onClick={() => act("cancel")}>
                Cancel
              </button>
            )}
            {!ACTIVE.has(j.state) && j.state !== "succeeded" && j.resumable && (
              <button type="button" class="primary" onClick={() => act("resume")}>
                Resume
              </button>
            )}
          </>
        }
      />
      <ErrorBanner error={action.error} what="The action failed" />
      <div class="grid stats">
        <Card>
          <div class="stat-label">State</div>
          <div class="stat-value">
            <StateBadge state={j.state} />
          </div>
        </Card>
        <Card>
          <div class="stat-label">Progress</div>
          <div class="stat-value" data-testid="job-progress">
            {total ? `${step ?? 0} / ${total}` : "–"}
          </div>
          {total ? <Meter kind="progress" value={step ?? 0} max={total} label="Job progress" /> : null}
        </Card>
        <Card>
          <div class="stat-label">Time left</div>
          <div class="stat-value">{active ? seconds(eta_seconds ?? null) : "–"}</div>
        </Card>
        <Card>
          <div class="stat-label">Latest loss</div>
          <div class="stat-value">{loss.length ? metric(loss[loss.length - 1][1]) : "–"}</div>
        </Card>
      </div>
      {j.error && (
        <div class="banner error" role="alert">
          {j.error}
        </div>
      )}
      {(series.length > 0 || j.kind === "train") && (
        <Card title="Loss">
          <div data-testid="loss-chart" data-points={loss.length}>
            <LineChart series={series} xLabel="step" yLabel="loss" label="Loss curve" />
          </div>
        </Card>
      )}
      <div class="grid two">
        <Card title="Parameters">
          <KeyValues items={Object.entries(j.params).filter(([, v]) => v !== null && typeof v !== "object").map(([k, v]) => [k, String(v)])} />
        </Card>
        <Card title="Result">
          {Object.keys(j.result).length === 0 ? (
            <Empty>{active ? "Running…" : "No result."}</Empty>
          ) : (
            <KeyValues items={resultItems(j.result)} />
          )}
        </Card>
      </div>
      <Card title="Log">
        <pre class="log" tabIndex={0} aria-label="Job log">
          {(log.data ?? "").split("\n").slice(-200).join("\n") || "No output yet."}
        </pre>
      </Card>
    </>
  );
}
