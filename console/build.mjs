// Builds the console into dist/: the page, its style sheet and one bundled
// script (nats.ws included), which the bridge serves at /console/.
import { cp, mkdir, rm } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const here = fileURLToPath(new URL('.', import.meta.url));
const src = `${here}src`;
const dist = `${here}dist`;

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
await esbuild.build({
  entryPoints: [`${src}/main.js`],
  outfile: `${dist}/app.js`,
  bundle: true,
  format: 'iife',
  target: ['es2020'],
  minify: true,
  sourcemap: true,
  legalComments: 'linked', // the bundled libraries' licence notices, in app.js.LEGAL.txt
  // tweetnacl (inside nats.ws) falls back to Node's crypto only where
  // globalThis.crypto is missing, which no supported browser lacks.
  external: ['crypto'],
  logLevel: 'warning',
});
for (const file of ['index.html', 'style.css']) {
  await cp(`${src}/${file}`, `${dist}/${file}`);
}
console.log(`console built into ${dist}`);
