// Keys and tenants: admins see every key and tenant; developers the keys of their own tenant.
import { useState } from "preact/hooks";
import { del, get, post } from "../api";
import { Badge, Card, Empty, ErrorBanner, Loading, PageHeader, Table, useAction } from "../components/ui";
import { count, when } from "../format";
import { useApi } from "../hooks";
import { useSession } from "../session";

interface KeyInfo {
  prefix: string;
  tenant: string;
  role: string;
  models: string[] | null;
  expires_at: string | null;
  revoked_at: string | null;
  created_at: string;
  created_by: string;
  active: boolean;
}

interface TenantInfo {
  name: string;
  requests_per_minute: number | null;
  tokens_per_minute: number | null;
  token_budget: number | null;
  budget_period: string;
}

function NewKey(props: { tenants: string[]; defaultTenant: string; admin: boolean; onCreated: () => void }) {
  const [tenant, setTenant] = useState(props.defaultTenant);
  const [role, setRole] = useState("consumer");
  const [days, setDays] = useState("");
  const [created, setCreated] = useState<string | null>(null);
  const { error, run } = useAction();
  const submit = (event: Event) => {
    event.preventDefault();
    const body: Record<string, unknown> = { tenant, role };
    if (days) body.expires_in_seconds = Math.round(Number(days) * 86400);
    run(async () => {
      setCreated((await post<{ key: string }>("/admin/keys", body)).key);
      props.onCreated();
    });
  };
  return (
    <form class="form-grid" onSubmit={submit}>
      <div>
        <label for="key-tenant">Tenant</label>
        {props.admin ? (
          <select id="key-tenant" value={tenant} onChange={(e) => setTenant((e.target as HTMLSelectElement).value)}>
            {props.tenants.map((t) => (
              <option key={t}>{t}</option>
            ))}
          </select>
        ) : (
          <input id="key-tenant" value={tenant} readOnly />
        )}
      </div>
      <div>
        <label for="key-role">Role</label>
        <select id="key-role" value={role} onChange={(e) => setRole((e.target as HTMLSelectElement).value)}>
          {(props.admin ? ["consumer", "developer", "admin"] : ["consumer", "developer"]).map((r) => (
            <option key={r}>{r}</option>
          ))}
        </select>
      </div>
      <div>
        <label for="key-days">Expires in (days, optional)</label>
        <input id="key-days" type="number" min={1} value={days} onInput={(e) => setDays((e.target as HTMLInputElement).value)} />
      </div>
      <div class="form-actions">
        <button type="submit" class="primary">
          Create key
        </button>
      </div>
      <ErrorBanner error={error} what="The key was not created" />
      {created && (
        <div class="banner ok" role="status">
          New key (shown once, copy it now): <code class="wrap">{created}</code>
        </div>
      )}
    </form>
  );
}

function NewTenant(props: { onCreated: () => void }) {
  const [name, setName] = useState("");
  const [rpm, setRpm] = useState("");
  const { error, run } = useAction();
  const submit = (event: Event) => {
    event.preventDefault();
    run(async () => {
      await post("/admin/tenants", { name: name.trim(), ...(rpm ? { requests_per_minute: Number(rpm) } : {}) });
      setName("");
      setRpm("");
      props.onCreated();
    });
  };
  return (
    <form class="form-grid" onSubmit={submit}>
      <div>
        <label for="tenant-name">Name</label>
        <input id="tenant-name" required value={name} onInput={(e) => setName((e.target as HTMLInputElement).value)} />
      </div>
      <div>
        <label for="tenant-rpm">Requests per minute (optional)</label>
        <input id="tenant-rpm" type="number" min={1} value={rpm} onInput={(e) => setRpm((e.target as HTMLInputElement).value)} />
      </div>
      <div class="form-actions">
        <button type="submit" class="primary" disabled={!name.trim()}>
          Create tenant
        </button>
      </div>
      <ErrorBanner error={error} what="The tenant was not created" />
    </form>
  );
}

export function Access() {
  const { me } = useSession();
  const admin = me.role === "admin";
  const keys = useApi(() => get<{ data: KeyInfo[] }>("/admin/keys"), []);
  const tenants = useApi(() => (admin ? get<{ data: TenantInfo[] }>("/admin/tenants") : Promise.resolve({ data: [] })), [admin]);
  const { error, run } = useAction();
  const revoke = (prefix: string) => {
    if (!window.confirm(`Revoke key ${prefix}…? Requests with it fail at once.`)) return;
    run(() => del(`/admin/keys/${encodeURIComponent(prefix)}`)).then(keys.reload);
  };
  const tenantNames = (tenants.data?.data ?? []).map((t) => t.name);
  return (
    <>
      <PageHeader title="Keys & tenants" subtitle="API keys are stored hashed; a new key is shown once." />
      <ErrorBanner error={keys.error ?? tenants.error ?? error} what="Access" />
      <Card title="API keys">
        {keys.loading && !keys.data ? (
          <Loading />
        ) : (keys.data?.data ?? []).length === 0 ? (
          <Empty>No keys. Authentication is off until the first key exists.</Empty>
        ) : (
          <Table
            head={
              <>
              <th>Key</th>
              <th>Tenant</th>
              <th>Role</th>
              <th class="hide-sm">Created</th>
              <th>Status</th>
              <th>
                <span class="sr-only">Actions</span>
              </th>

              </>
            }
          >
            {(keys.data?.data ?? []).map((k) => (
              <tr key={k.prefix}>
                <td class="mono">{k.prefix}…</td>
                <td>{k.tenant}</td>
                <td>{k.role}</td>
                <td class="hide-sm">
                  {when(k.created_at)} by {k.created_by}
                </td>
                <td>
                  {k.active ? <Badge tone="green">active</Badge> : <Badge tone="gray">{k.revoked_at ? "revoked" : "expired"}</Badge>}
                </td>
                <td>
                  {k.active && (
                    <button type="button" class="ghost small" onClick={() => revoke(k.prefix)} aria-label={`Revoke key ${k.prefix}`}>
                      Revoke
                    </button>
                  )}
                </td>
              </tr>
            ))}

          </Table>
        )}
        <h3>New key</h3>
        <NewKey tenants={tenantNames.length ? tenantNames : [me.tenant]} defaultTenant={me.tenant} admin={admin} onCreated={keys.reload} />
      </Card>
      {admin && (
        <Card title="Tenants">
          <Table
            head={
              <>
              <th>Tenant</th>
              <th class="num">Requests/min</th>
              <th class="num">Tokens/min</th>
              <th class="num">Budget</th>

              </>
            }
          >
            {(tenants.data?.data ?? []).map((t) => (
              <tr key={t.name}>
                <td>{t.name}</td>
                <td class="num">{t.requests_per_minute ?? "∞"}</td>
                <td class="num">{t.tokens_per_minute ?? "∞"}</td>
                <td class="num">{t.token_budget === null ? "∞" : `${count(t.token_budget)} / ${t.budget_period}`}</td>
              </tr>
            ))}

          </Table>
          <h3>New tenant</h3>
          <NewTenant onCreated={tenants.reload} />
        </Card>
      )}
    </>
  );
}
