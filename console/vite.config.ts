// Builds the console into the Python package, so `pip install llmos` serves it with no Node.js at run time.
import { defineConfig } from "vite";
import preact from "@preact/preset-vite";

export default defineConfig({
  base: "/console/",
  plugins: [preact()],
  build: {
    outDir: "../src/llmos/console/static",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    target: "es2022",
  },
});
