// Log in with an API key (created with `llmos keys create`); the key is checked against the server before use.
import { useState } from "preact/hooks";

export function Login(props: { onLogin: (key: string) => Promise<void> }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (event: Event) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await props.onLogin(key.trim());
    } catch (exc) {
      setError((exc as Error).message);
    } finally {
      setBusy(false);
    }
  };
  return (
    <main class="login" id="main">
      <form class="login-card" onSubmit={submit}>
        <div class="brand large">
          <img src="/console/logo.svg" alt="" width={40} height={40} />
          <span>llmos</span>
        </div>
        <h1>Sign in</h1>
        <p class="muted">Use an API key of this server. Create one with <code>llmos keys create</code>.</p>
        <label for="api-key">API key</label>
        <input
          id="api-key"
          type="password"
          autoComplete="off"
          autoFocus
          required
          placeholder="llmos-…"
          value={key}
          onInput={(e) => setKey((e.target as HTMLInputElement).value)}
        />
        {error && (
          <div class="banner error" role="alert">
            {error}
          </div>
        )}
        <button type="submit" class="primary" disabled={busy || !key.trim()}>
          {busy ? "Checking…" : "Sign in"}
        </button>
        <p class="muted small">The key is kept in this browser tab only and sent to this server alone.</p>
      </form>
    </main>
  );
}
