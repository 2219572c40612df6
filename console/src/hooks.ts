// Small state hooks: the current hash route, and data loaded (and optionally polled) from the API.
import { useCallback, useEffect, useRef, useState } from "preact/hooks";
import { ApiError } from "./api";

/** The part of the URL after `#`, still percent-encoded, e.g. `/models/smollm2%3Alatest`; `/` when empty. */
export function useRoute(): string {
  const read = () => window.location.hash.replace(/^#/, "") || "/";
  const [route, setRoute] = useState(read);
  useEffect(() => {
    const changed = () => setRoute(read());
    window.addEventListener("hashchange", changed);
    return () => window.removeEventListener("hashchange", changed);
  }, []);
  return route;
}

export function navigate(route: string): void {
  window.location.hash = route;
}

export interface Loaded<T> {
  data: T | null;
  error: ApiError | Error | null;
  loading: boolean;
  reload: () => void;
}

/**
 * Run `load` now, whenever `deps` change, and every `everyMs` milliseconds while the tab is visible (0 = once).
 * Polls never overlap: the next one starts after the previous answer. Hidden tabs poll five times less often.
 */
export function useApi<T>(load: () => Promise<T>, deps: unknown[], everyMs = 0): Loaded<T> {
  const [data, setData] = useState<T | null>(null);
  const [error, setError] = useState<ApiError | Error | null>(null);
  const [loading, setLoading] = useState(true);
  const [tick, setTick] = useState(0);
  const alive = useRef(true);
  useEffect(() => {
    alive.current = true;
    let timer: number | undefined;
    const run = async () => {
      try {
        const value = await load();
        if (!alive.current) return;
        setData(value);
        setError(null);
      } catch (exc) {
        if (!alive.current) return;
        setError(exc as Error);
      } finally {
        if (alive.current) {
          setLoading(false);
          if (everyMs > 0) timer = window.setTimeout(run, document.hidden ? everyMs * 5 : everyMs);
        }
      }
    };
    setLoading(true);
    run();
    return () => {
      alive.current = false;
      window.clearTimeout(timer);
    };
  }, [...deps, everyMs, tick]); // a change of interval (e.g. a job finished: 0) loads once more, then polls anew
  const reload = useCallback(() => setTick((t) => t + 1), []);
  return { data, error, loading, reload };
}
