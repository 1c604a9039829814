// The one change made to Baileys for this check: its Noise handshake
// verifies WhatsApp's certificate chain, which the fake cannot produce (it
// does not hold WhatsApp's keys). This removes the two signature checks and
// nothing else; if the pinned Baileys no longer has exactly this code, it
// fails instead of patching something else.
import { readFileSync, writeFileSync } from 'node:fs'

const file = new URL('./node_modules/baileys/lib/Utils/noise-handler.js', import.meta.url)
const checks = `            if (!verify) {
                throw new Boom('noise certificate signature invalid', { statusCode: 400 });
            }
            if (!verifyIntermediate) {
                throw new Boom('noise intermediate certificate signature invalid', { statusCode: 400 });
            }`
const skipped = `            // wa-pair conformance: fake-wa's certificate chain is not signed
            // by WhatsApp's keys; only these two checks are skipped.
            void verify;
            void verifyIntermediate;`
const source = readFileSync(file, 'utf8')
if (source.includes(skipped)) {
  console.log('certificate-chain check already skipped')
} else if (source.includes(checks)) {
  writeFileSync(file, source.replace(checks, skipped))
  console.log('certificate-chain check skipped')
} else {
  console.error('the pinned Baileys does not have the expected certificate checks; update patch-cert-check.mjs')
  process.exit(1)
}
