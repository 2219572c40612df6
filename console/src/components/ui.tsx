// Building blocks shared by the pages: headers, cards, badges, meters, error and empty states.
import type { ComponentChildren } from "preact";
import { useState } from "preact/hooks";
import { ApiError } from "../api";

export function PageHeader(props: { title: string; subtitle?: ComponentChildren; actions?: ComponentChildren }) {
  return (
    <header class="page-header">
      <div>
        <h1 tabIndex={-1} id="page-title">
          {props.title}
        </h1>
        {props.subtitle && <p class="subtitle">{props.subtitle}</p>}
      </div>
      {props.actions && <div class="actions">{props.actions}</div>}
    </header>
  );
}

export function Card(props: { title?: ComponentChildren; children: ComponentChildren; class?: string; actions?: ComponentChildren }) {
  return (
    <section class={`card ${props.class ?? ""}`}>
      {(props.title || props.actions) && (
        <div class="card-head">
          {props.title && <h2>{props.title}</h2>}
          {props.actions}
        </div>
      )}
      {props.children}
    </section>
  );
}

export function Stat(props: { label: string; value: ComponentChildren; hint?: ComponentChildren }) {
  return (
    <div class="stat">
      <div class="stat-label">{props.label}</div>
      <div class="stat-value">{props.value}</div>
      {props.hint && <div class="stat-hint">{props.hint}</div>}
    </div>
  );
}

const STATE_TONE: Record<string, string> = {
  running: "blue",
  queued: "gray",
  succeeded: "green",
  failed: "red",
  cancelled: "amber",
  interrupted: "amber",
};

export function Badge(props: { children: ComponentChildren; tone?: string }) {
  return <span class={`badge ${props.tone ?? "gray"}`}>{props.children}</span>;
}

export function StateBadge(props: { state: string }) {
  return <Badge tone={STATE_TONE[props.state] ?? "gray"}>{props.state}</Badge>;
}

/** A horizontal bar; `kind="capacity"` turns amber and red as it fills (memory), `"progress"` green when done. */
export function Meter(props: { value: number; max: number; label: string; kind?: "capacity" | "progress" }) {
  const share = props.max > 0 ? Math.min(1, props.value / props.max) : 0;
  const tone =
    props.kind === "progress" ? (share >= 1 ? "green" : "blue") : share > 0.9 ? "red" : share > 0.7 ? "amber" : "blue";
  return (
    <div class="meter" role="meter" aria-label={props.label} aria-valuemin={0} aria-valuemax={props.max} aria-valuenow={props.value}>
      <div class={`meter-fill ${tone}`} style={{ width: `${(share * 100).toFixed(1)}%` }} />
    </div>
  );
}

export function ErrorBanner(props: { error: Error | null; what?: string }) {
  if (!props.error) return null;
  const status = props.error instanceof ApiError ? ` (${props.error.status})` : "";
  return (
    <div class="banner error" role="alert">
      <strong>{props.what ?? "Something went wrong"}{status}:</strong> {props.error.message}
    </div>
  );
}

export function Empty(props: { children: ComponentChildren }) {
  return <div class="empty">{props.children}</div>;
}

export function Loading() {
  return (
    <div class="loading" aria-live="polite">
      <span class="spinner" aria-hidden="true" /> Loading…
    </div>
  );
}

export function KeyValues(props: { items: [string, ComponentChildren][] }) {
  return (
    <dl class="kv">
      {props.items.map(([key, value]) => (
        <div key={key}>
          <dt>{key}</dt>
          <dd>{value}</dd>
        </div>
      ))}
    </dl>
  );
}

/** A table that scrolls sideways inside its card on narrow screens; `head` is the header row's cells. */
export function Table(props: { head: ComponentChildren; children: ComponentChildren; class?: string; testId?: string }) {
  return (
    <div class="table-scroll">
      <table class={props.class} data-testid={props.testId}>
        <thead>
          <tr>{props.head}</tr>
        </thead>
        <tbody>{props.children}</tbody>
      </table>
    </div>
  );
}

/**
 * State for a button or form that calls the API: `run(fn)` clears the last error, awaits `fn`, keeps its error to
 * show with <ErrorBanner>, and reports whether it succeeded.
 */
export function useAction(): { error: Error | null; busy: boolean; run: (fn: () => Promise<unknown>) => Promise<boolean> } {
  const [error, setError] = useState<Error | null>(null);
  const [busy, setBusy] = useState(false);
  const run = async (fn: () => Promise<unknown>) => {
    setError(null);
    setBusy(true);
    try {
      await fn();
      return true;
    } catch (exc) {
      setError(exc as Error);
      return false;
    } finally {
      setBusy(false);
    }
  };
  return { error, busy, run };
}
