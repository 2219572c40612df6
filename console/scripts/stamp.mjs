// Writes build-info.json next to the built console: the digest of the sources it was built from.
// tests/unit/test_console_build.py recomputes it, so a source change without `make console` fails the tests.
import { createHash } from "node:crypto";
import { readFileSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";

const root = new URL("..", import.meta.url).pathname;
const inputs = ["index.html", "package.json", "package-lock.json", "tsconfig.json", "vite.config.ts", "public", "src"];

function files(path) {
  const full = join(root, path);
  if (statSync(full).isDirectory()) return readdirSync(full).flatMap((name) => files(join(path, name)));
  return [path];
}

const hash = createHash("sha256");
for (const file of inputs.flatMap(files).sort()) {
  hash.update(relative(root, join(root, file)).split("\\").join("/"));
  hash.update("\0");
  hash.update(readFileSync(join(root, file)));
  hash.update("\0");
}
const out = join(root, "../src/llmos/console/static/build-info.json");
writeFileSync(out, JSON.stringify({ sources_sha256: hash.digest("hex") }, null, 2) + "\n");
console.log(`stamped ${out}`);
