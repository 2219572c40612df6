// The frame around every page: a skip link, the navigation (a drawer on phones) and the signed-in identity.
import type { ComponentChildren } from "preact";
import { useEffect, useState } from "preact/hooks";
import { atLeast, useSession } from "../session";

interface NavItem {
  route: string;
  label: string;
  icon: string;
  role: "consumer" | "developer" | "admin";
}

const NAV: NavItem[] = [
  { route: "/models", label: "Models", icon: "M4 6h16M4 12h16M4 18h10", role: "consumer" },
  { route: "/chat", label: "Playground", icon: "M4 5h16v11H9l-5 4z", role: "consumer" },
  { route: "/datasets", label: "Datasets", icon: "M5 6c0-2 14-2 14 0v12c0 2-14 2-14 0zM5 6c0 2 14 2 14 0M5 12c0 2 14 2 14 0", role: "developer" },
  { route: "/jobs", label: "Jobs", icon: "M4 19h16M7 16V9m5 7V5m5 11v-4", role: "developer" },
  { route: "/runtime", label: "Runtime", icon: "M4 5h16v6H4zM4 13h16v6H4zM8 8h.01M8 16h.01", role: "admin" },
  { route: "/usage", label: "Usage", icon: "M5 19V9m7 10V5m7 14v-7", role: "admin" },
  { route: "/access", label: "Keys & tenants", icon: "M14 10a4 4 0 1 0-3.5 4L6 18.5V21h3v-2h2v-2l1.5-1.5", role: "developer" },
];

export function visibleNav(role: "consumer" | "developer" | "admin"): NavItem[] {
  return NAV.filter((item) => atLeast({ role, actor: "", tenant: "", auth: true }, item.role));
}

export function Layout(props: { route: string; children: ComponentChildren }) {
  const { me, logout } = useSession();
  const [open, setOpen] = useState(false);
  useEffect(() => {
    setOpen(false);
    document.getElementById("page-title")?.focus({ preventScroll: true });
  }, [props.route]);
  const current = "/" + (props.route.split("/")[1] ?? "");
  return (
    <div class={`shell ${open ? "nav-open" : ""}`}>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById("main")?.focus(); }}>
        Skip to content
      </a>
      <aside class="sidebar">
        <div class="brand">
          <img src="/console/logo.svg" alt="" width={28} height={28} />
          <span>llmos</span>
        </div>
        <nav aria-label="Main">
          <ul>
            {visibleNav(me.role).map((item) => (
              <li key={item.route}>
                <a href={`#${item.route}`} aria-current={current === item.route ? "page" : undefined}>
                  <svg viewBox="0 0 24 24" aria-hidden="true">
                    <path d={item.icon} />
                  </svg>
                  {item.label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <div class="whoami">
          <div>
            <div class="who">{me.actor}</div>
            <div class="muted">
              {me.tenant} · {me.role}
            </div>
          </div>
          {me.auth && (
            <button type="button" class="ghost small" onClick={logout}>
              Log out
            </button>
          )}
        </div>
      </aside>
      <div class="topbar">
        <button type="button" class="ghost" aria-expanded={open} aria-controls="nav" onClick={() => setOpen(!open)}>
          ☰ <span class="sr-only">Menu</span>
        </button>
        <span class="brand small">
          <img src="/console/logo.svg" alt="" width={22} height={22} /> llmos
        </span>
      </div>
      <main id="main" tabIndex={-1}>
        {props.children}
      </main>
    </div>
  );
}
