// The console's entry point: log in, then route `#/...` to a page inside the layout.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import "./styles.css";
import { ApiError, get, storeKey, storedKey, type Me } from "./api";
import { Layout, visibleNav } from "./components/Layout";
import { ErrorBanner, Loading } from "./components/ui";
import { navigate, useRoute } from "./hooks";
import { Access } from "./pages/Access";
import { Chat } from "./pages/Chat";
import { Datasets } from "./pages/Datasets";
import { JobDetail, Jobs } from "./pages/Jobs";
import { Login } from "./pages/Login";
import { ModelDetail, Models } from "./pages/Models";
import { Runtime } from "./pages/Runtime";
import { Usage } from "./pages/Usage";
import { SessionContext } from "./session";

function safeDecode(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

function Page(props: { route: string }) {
  const [, section, ...rest] = props.route.split("/");
  const arg = safeDecode(rest.join("/"));
  switch (section) {
    case "models":
      return arg ? <ModelDetail name={arg} /> : <Models />;
    case "chat":
      return <Chat initialModel={arg || null} />;
    case "datasets":
      return <Datasets selected={arg || null} />;
    case "jobs":
      return arg ? <JobDetail id={arg} /> : <Jobs />;
    case "runtime":
      return <Runtime />;
    case "usage":
      return <Usage />;
    case "access":
      return <Access />;
    default:
      return null;
  }
}

function App() {
  const route = useRoute();
  const [me, setMe] = useState<Me | null>(null);
  const [error, setError] = useState<Error | null>(null);
  const [checking, setChecking] = useState(true);

  const identify = async () => {
    setChecking(true);
    try {
      const info = await get<{ auth_required: boolean }>("/console/info.json");
      if (info.auth_required && !storedKey()) {
        setMe(null);
        return;
      }
      setMe(await get<Me>("/admin/me"));
      setError(null);
    } catch (exc) {
      if (exc instanceof ApiError && exc.status === 401) storeKey(null);
      else setError(exc as Error);
      setMe(null);
    } finally {
      setChecking(false);
    }
  };
  useEffect(() => {
    identify();
  }, []);
  useEffect(() => {
    if (me && (route === "/" || route === "/login")) navigate(visibleNav(me.role)[0].route);
  }, [me, route]);

  if (checking) return <Loading />;
  if (me === null) {
    return (
      <>
        <ErrorBanner error={error} what="Cannot reach the server" />
        <Login
          onLogin={async (key) => {
            storeKey(key);
            try {
              setMe(await get<Me>("/admin/me"));
            } catch (exc) {
              storeKey(null);
              throw exc;
            }
          }}
        />
      </>
    );
  }
  const logout = () => {
    storeKey(null);
    setMe(null);
    navigate("/login");
  };
  return (
    <SessionContext.Provider value={{ me, logout }}>
      <Layout route={route}>
        <Page route={route} />
      </Layout>
    </SessionContext.Provider>
  );
}

render(<App />, document.getElementById("app")!);
