// Who is logged in: shared by every page through a context.
import { createContext } from "preact";
import { useContext } from "preact/hooks";
import type { Me } from "./api";

export interface Session {
  me: Me;
  logout: () => void;
}

export const SessionContext = createContext<Session | null>(null);

export function useSession(): Session {
  const session = useContext(SessionContext);
  if (session === null) throw new Error("no session");
  return session;
}

const RANK = { consumer: 0, developer: 1, admin: 2 } as const;

export function atLeast(me: Me, role: keyof typeof RANK): boolean {
  return RANK[me.role] >= RANK[role];
}
