// The console's only way to the server: the same HTTP API every client uses, with the key the user logged in with.
// The key lives in sessionStorage (gone when the tab closes) and travels as `Authorization: Bearer`, never in a URL.

const KEY_STORAGE = "llmos.key";

export class ApiError extends Error {
  constructor(
    public status: number,
    message: string,
    public code: string | null = null,
  ) {
    super(message);
  }
}

export function storedKey(): string | null {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key: string | null): void {
  if (key === null) sessionStorage.removeItem(KEY_STORAGE);
  else sessionStorage.setItem(KEY_STORAGE, key);
}

function headers(extra: Record<string, string> = {}): Record<string, string> {
  const key = storedKey();
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

async function failure(response: Response): Promise<ApiError> {
  let message = `${response.status} ${response.statusText}`;
  let code: string | null = null;
  try {
    const body = await response.json();
    if (body?.error?.message) {
      message = body.error.message;
      code = body.error.code ?? null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, code);
}

export async function request<T>(method: string, path: string, body?: unknown): Promise<T> {
  const init: RequestInit = { method, headers: headers(body === undefined ? {} : { "content-type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  const type = response.headers.get("content-type") ?? "";
  return (type.includes("json") ? await response.json() : await response.text()) as T;
}

export const get = <T>(path: string) => request<T>("GET", path);
export const post = <T>(path: string, body: unknown = {}) => request<T>("POST", path, body);
export const del = <T>(path: string) => request<T>("DELETE", path);

export interface ChatMessage {
  role: "system" | "user" | "assistant";
  content: string;
}

/** Decode speed of a finished stream: tokens after the first over the time between first and last token. */
export function tokensPerSecond(stats: StreamStats): number | null {
  const { firstTokenSeconds: first, lastTokenSeconds: last, completionTokens: n } = stats;
  if (first === null || last === null || n < 2 || last <= first) return null;
  return (n - 1) / (last - first);
}

export interface StreamStats {
  completionTokens: number;
  promptTokens: number;
  firstTokenSeconds: number | null;
  lastTokenSeconds: number | null;
  seconds: number;
  fingerprint: string | null;
  finishReason: string | null;
}

/** Stream a chat completion; `onText` gets each piece of text as it arrives. Resolves with usage and timings. */
export async function streamChat(
  body: Record<string, unknown>,
  onText: (text: string) => void,
  signal: AbortSignal,
): Promise<StreamStats> {
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "content-type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  if (!response.ok || response.body === null) throw await failure(response);
  const stats: StreamStats = {
    completionTokens: 0,
    promptTokens: 0,
    firstTokenSeconds: null,
    lastTokenSeconds: null,
    seconds: 0,
    fingerprint: null,
    finishReason: null,
  };
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message, chunk.error.code ?? null);
        stats.fingerprint = chunk.system_fingerprint ?? stats.fingerprint;
        if (chunk.usage) {
          stats.completionTokens = chunk.usage.completion_tokens;
          stats.promptTokens = chunk.usage.prompt_tokens;
        }
        for (const choice of chunk.choices ?? []) {
          const text: string | undefined = choice.delta?.content;
          if (text) {
            const now = (performance.now() - started) / 1000;
            if (stats.firstTokenSeconds === null) stats.firstTokenSeconds = now;
            stats.lastTokenSeconds = now;
            onText(text);
          }
          if (choice.finish_reason) stats.finishReason = choice.finish_reason;
        }
      }
    }
  }
  stats.seconds = (performance.now() - started) / 1000;
  return stats;
}

// --- shapes of the API's answers the console reads ----------------------------------------------------------------

export interface Me {
  actor: string;
  tenant: string;
  role: "consumer" | "developer" | "admin";
  auth: boolean;
}

export interface Lineage {
  operation: string;
  parent_digest: string | null;
  parent_name: string | null;
  params: Record<string, unknown>;
  created_at: string;
}

export interface ModelInfo {
  name: string;
  repository: string;
  tag: string | null;
  tags: string[];
  digest: string;
  short_digest: string;
  format: string;
  architecture: string | null;
  parameter_count: number | null;
  quantization: string | null;
  context_length: number | null;
  size: number;
  created_at: string;
  lineage: Lineage[];
  files: { path: string; digest: string; size: number }[];
}

export interface Report {
  id: number;
  model: string;
  model_digest: string;
  task: string;
  dataset: string | null;
  metrics: Record<string, number | string | null>;
  created_at: string;
  job_id: string | null;
}

export interface ModelDetails extends ModelInfo {
  graph: { nodes: { digest: string; name: string; format: string | null }[]; edges: { from: string; to: string; operation: string }[] };
  evaluations: Report[];
  compression: Record<string, unknown> | null;
}

export interface Job {
  id: string;
  kind: string;
  state: string;
  params: Record<string, unknown>;
  progress: { step?: number; total?: number; eta_seconds?: number | null; metrics?: Record<string, number> };
  result: Record<string, unknown>;
  error: string | null;
  resumable: boolean;
  attempts: number;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  created_by: string;
}

export interface ResidentModel {
  name: string;
  digest: string;
  backend: string;
  size: number;
  memory: number;
  in_flight: number;
  pinned: boolean;
  expires_at: number | null;
  loaded_at: number;
  load_seconds: number;
  replicas?: number;
  slots?: number;
  running?: number;
  waiting?: number;
  kv_cells_used?: number;
  kv_cells_total?: number;
  generated_tokens?: number;
  prompt_tokens?: number;
}

export interface Runtime {
  budget: number;
  used: number;
  rss: number;
  models: ResidentModel[];
}
