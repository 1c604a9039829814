// Baileys against the standalone fake WhatsApp (crates/fake-wa), over
// loopback, by pairing code. Run by .ci/conformance:
//
//   FAKE_WA_BIN=target/debug/fake-wa node link.mjs            # links
//   FAKE_WA_BIN=target/debug/fake-wa node link.mjs wrong-code # does not
//
// "links": Baileys shows a QR (checked for WhatsApp Web's format), asks for
// a pairing code, the fake phone types it, pair-success, stream error 515,
// Baileys logs in again as the new device, the connection opens, and the
// fake's record says linked and logged in with no refused login.
// "wrong-code": the phone types another code; nothing links.
import { spawn } from 'node:child_process'
import { createInterface } from 'node:readline'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import makeWASocket, { useMultiFileAuthState, DisconnectReason } from 'baileys'
import pino from 'pino'

const scenario = process.argv[2] ?? 'links'
const PHONE = scenario === 'links' ? '6281299900001' : '6281299900002'
const TIMEOUT_MS = 60_000

const fake = spawn(process.env.FAKE_WA_BIN, [], { stdio: ['pipe', 'pipe', 'inherit'] })
const answers = []
createInterface({ input: fake.stdout }).on('line', (line) => answers.shift()?.(JSON.parse(line)))
const nextLine = () => new Promise((resolve) => answers.push(resolve))
const ask = (command) => {
  const answer = nextLine()
  fake.stdin.write(JSON.stringify(command) + '\n')
  return answer
}
const dir = mkdtempSync(join(tmpdir(), 'baileys-'))
const finish = (ok, message) => {
  console[ok ? 'log' : 'error'](`${ok ? 'PASS' : 'FAIL'} (${scenario}): ${message}`)
  fake.kill()
  rmSync(dir, { recursive: true, force: true })
  process.exit(ok ? 0 : 1)
}
setTimeout(() => finish(false, `nothing decided within ${TIMEOUT_MS} ms`), TIMEOUT_MS).unref()

// WhatsApp Web's QR: ref, then the noise key, identity key and ADV secret
// (32 bytes each, base64), then anything newer clients add; Baileys 7
// prefixes it with the link WhatsApp's camera opens.
const QR_LINK = 'https://wa.me/settings/linked_devices#'
const checkQr = (qr) => {
  const [ref, ...keys] = (qr.startsWith(QR_LINK) ? qr.slice(QR_LINK.length) : qr).split(',')
  if (!ref.startsWith('2@')) return `QR ref ${JSON.stringify(ref)} is not a WhatsApp ref`
  for (const key of keys.slice(0, 3)) {
    if (Buffer.from(key, 'base64').length !== 32) return `QR part ${JSON.stringify(key)} is not a 32-byte key`
  }
  return keys.length >= 3 ? null : `QR has ${keys.length + 1} parts, expected at least 4`
}

const { ws_url: wsUrl } = await nextLine()
const { state, saveCreds } = await useMultiFileAuthState(dir)
const logger = pino({ level: process.env.BAILEYS_LOG ?? 'silent' })
let asked = false

const connect = () => {
  const sock = makeWASocket({ auth: state, waWebSocketUrl: wsUrl, logger })
  sock.ev.on('creds.update', saveCreds)
  sock.ev.on('connection.update', async ({ connection, lastDisconnect, qr }) => {
    if (qr && !asked) {
      asked = true
      const bad = checkQr(qr)
      if (bad) finish(false, bad)
      const code = await sock.requestPairingCode(PHONE)
      // Baileys returns the code it made before the server has answered
      // its request: the phone can type it only once the fake has it.
      for (let tries = 0; !(await ask({ cmd: 'record', phone: PHONE })).record?.code_requests; tries++) {
        if (tries > 100) finish(false, 'the fake never saw the code request')
        await new Promise((resolve) => setTimeout(resolve, 50))
      }
      const typed = scenario === 'links' ? code : code === 'ZZZZZZZZ' ? 'YYYYYYYY' : 'ZZZZZZZZ'
      const entered = await ask({ cmd: 'enter_code', phone: PHONE, code: typed })
      if (scenario === 'wrong-code') {
        const { record } = await ask({ cmd: 'record', phone: PHONE })
        if (entered.ok) finish(false, 'a wrong code linked')
        if (!entered.error.startsWith('wrong code')) finish(false, `not refused as a wrong code: ${entered.error}`)
        if (record.linked) finish(false, 'the fake recorded a link for a wrong code')
        finish(true, `refused: ${entered.error}`)
      }
      if (!entered.ok) finish(false, `the issued code did not link: ${entered.error}`)
    }
    if (connection === 'open') {
      const { record } = await ask({ cmd: 'record', phone: PHONE })
      if (!record?.linked || !record.logged_in || record.refused_logins !== 0) {
        finish(false, `fake record: ${JSON.stringify(record)}`)
      }
      sock.end(undefined)
      finish(true, `linked as ${record.linked.jid}, logged in after 515`)
    }
    if (connection === 'close') {
      const status = lastDisconnect?.error?.output?.statusCode
      // 515 after pair-success: log in again as the new device.
      if (status === DisconnectReason.restartRequired) connect()
      else if (scenario === 'links') finish(false, `connection closed with ${status}`)
    }
  })
}
connect()
