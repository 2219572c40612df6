// Dependency-free SVG charts: a line chart (loss curves) and horizontal bars (usage), both scaling to their box.
import { metric } from "../format";

export interface Series {
  name: string;
  points: [number, number][];
  tone: string;
}

function ticks(min: number, max: number, count = 4): number[] {
  if (max === min) return [min];
  const step = (max - min) / count;
  return Array.from({ length: count + 1 }, (_, i) => min + i * step);
}

export function LineChart(props: { series: Series[]; xLabel: string; yLabel: string; height?: number; label: string }) {
  const width = 640;
  const height = props.height ?? 240;
  const pad = { left: 52, right: 16, top: 12, bottom: 34 };
  const all = props.series.flatMap((s) => s.points);
  if (all.length === 0) return <div class="empty">No points yet.</div>;
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]);
  const [xMin, xMax] = [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
  let [yMin, yMax] = [Math.min(...ys), Math.max(...ys)];
  if (yMin === yMax) [yMin, yMax] = [yMin - 1, yMax + 1];
  const x = (v: number) => pad.left + ((v - xMin) / (xMax - xMin)) * (width - pad.left - pad.right);
  const y = (v: number) => pad.top + (1 - (v - yMin) / (yMax - yMin)) * (height - pad.top - pad.bottom);
  return (
    <figure class="chart">
      <svg viewBox={`0 0 ${width} ${height}`} role="img" aria-label={props.label} preserveAspectRatio="xMidYMid meet">
        {ticks(yMin, yMax).map((t) => (
          <g key={`y${t}`}>
            <line class="grid" x1={pad.left} x2={width - pad.right} y1={y(t)} y2={y(t)} />
            <text class="tick" x={pad.left - 6} y={y(t) + 4} text-anchor="end">
              {metric(t)}
            </text>
          </g>
        ))}
        {[...new Set(ticks(xMin, xMax).map((t) => Math.round(t)))].map((t) => (
          <text key={`x${t}`} class="tick" x={x(t)} y={height - pad.bottom + 16} text-anchor="middle">
            {t}
          </text>
        ))}
        <text class="axis-label" x={(pad.left + width - pad.right) / 2} y={height - 4} text-anchor="middle">
          {props.xLabel}
        </text>
        <text class="axis-label" x={12} y={height / 2} transform={`rotate(-90 12 ${height / 2})`} text-anchor="middle">
          {props.yLabel}
        </text>
        {props.series.map((s) => (
          <g key={s.name}>
            <polyline class={`line ${s.tone}`} points={s.points.map(([a, b]) => `${x(a)},${y(b)}`).join(" ")} />
            {s.points.length <= 60 &&
              s.points.map(([a, b]) => <circle key={a} class={`dot ${s.tone}`} cx={x(a)} cy={y(b)} r={2.5} />)}
          </g>
        ))}
      </svg>
      <figcaption class="legend">
        {props.series.map((s) => (
          <span key={s.name}>
            <i class={`swatch ${s.tone}`} /> {s.name}
          </span>
        ))}
      </figcaption>
    </figure>
  );
}

export function BarChart(props: { rows: { label: string; value: number }[]; format: (v: number) => string; label: string }) {
  const max = Math.max(1, ...props.rows.map((r) => r.value));
  return (
    <div class="bars" role="img" aria-label={props.label}>
      {props.rows.map((row) => (
        <div class="bar-row" key={row.label}>
          <span class="bar-label" title={row.label}>
            {row.label}
          </span>
          <span class="bar-track">
            <span class="bar-fill" style={{ width: `${((row.value / max) * 100).toFixed(1)}%` }} />
          </span>
          <span class="bar-value">{props.format(row.value)}</span>
        </div>
      ))}
    </div>
  );
}

export interface GraphNode {
  digest: string;
  name: string;
  format: string | null;
}

/** A model's ancestry as columns from oldest (left) to the version itself (right); each stored node links to its page. */
export function LineageGraph(props: { nodes: GraphNode[]; edges: { from: string; to: string; operation: string }[]; current: string }) {
  const depth = new Map<string, number>([[props.current, 0]]);
  let changed = true;
  while (changed) {
    changed = false;
    for (const e of props.edges) {
      const d = depth.get(e.to);
      if (d !== undefined && (depth.get(e.from) ?? -1) < d + 1) {
        depth.set(e.from, d + 1);
        changed = d + 1 < 20;
      }
    }
  }
  const maxDepth = Math.max(0, ...depth.values());
  const columns: GraphNode[][] = Array.from({ length: maxDepth + 1 }, () => []);
  for (const node of props.nodes) columns[maxDepth - (depth.get(node.digest) ?? 0)].push(node);
  const boxW = 180;
  const boxH = 46;
  const gapX = 70;
  const gapY = 18;
  const rows = Math.max(...columns.map((c) => c.length));
  const width = columns.length * boxW + (columns.length - 1) * gapX + 8;
  const height = rows * boxH + (rows - 1) * gapY + 8;
  const place = new Map<string, [number, number]>();
  columns.forEach((column, ci) =>
    column.forEach((node, ri) => place.set(node.digest, [4 + ci * (boxW + gapX), 4 + ri * (boxH + gapY)])),
  );
  const short = (s: string) => (s.length > 24 ? `${s.slice(0, 23)}…` : s);
  return (
    <div class="graph-scroll">
      <svg viewBox={`0 0 ${width} ${height}`} width={width} height={height} role="img" aria-label="Lineage graph">
        <defs>
          <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">
            <path d="M0,0 L10,5 L0,10 z" class="arrow" />
          </marker>
        </defs>
        {props.edges.map((e) => {
          const a = place.get(e.from);
          const b = place.get(e.to);
          if (!a || !b) return null;
          const [x1, y1, x2, y2] = [a[0] + boxW, a[1] + boxH / 2, b[0], b[1] + boxH / 2];
          return (
            <g key={`${e.from}-${e.to}-${e.operation}`}>
              <path class="edge" d={`M${x1},${y1} C${x1 + gapX / 2},${y1} ${x2 - gapX / 2},${y2} ${x2},${y2}`} marker-end="url(#arrow)" />
              <text class="edge-label" x={(x1 + x2) / 2} y={(y1 + y2) / 2 - 6} text-anchor="middle">
                {e.operation}
              </text>
            </g>
          );
        })}
        {props.nodes.map((n) => {
          const p = place.get(n.digest);
          if (!p) return null;
          return (
            <a key={n.digest} href={n.format ? `#/${n.format === "dataset" ? "datasets" : "models"}/${encodeURIComponent(n.name)}` : undefined} class={n.digest === props.current ? "node current" : "node"}>
              <rect x={p[0]} y={p[1]} width={boxW} height={boxH} rx={8} />
              <text x={p[0] + 10} y={p[1] + 19}>
                {short(n.name)}
              </text>
              <text class="node-sub" x={p[0] + 10} y={p[1] + 36}>
                {n.format ?? "removed"} · {n.digest.replace("sha256:", "").slice(0, 12)}
              </text>
            </a>
          );
        })}
      </svg>
    </div>
  );
}
