// A Baileys gateway's auth-state traffic, without a WhatsApp connection: the real library
// (@whiskeysockets/baileys, useMultiFileAuthState) keeps writing DIR the way a connected socket
// does: creds.json on every creds update, and signal keys (pre-keys generated and consumed,
// sessions, sender keys, app-state versions) through state.keys.set.
//
//   node writer.mjs DIR [--rate 40] [--keys 3] [--busy-ms 2] [--seconds 0] [--journal PATH]
//
//   --rate R      creds saves per second (each tick: mutate creds, save them, write keys)
//   --keys N      key writes per tick (sessions, sender keys, ...), besides pre-keys
//   --busy-ms M   synchronous CPU work per event-loop turn in between (a gateway's loop is
//                 busy decoding and encrypting); 0 leaves the loop idle
//   --seconds S   stop after S seconds (0: run until killed)
//   --journal P   where to append what each save meant (default DIR.journal, outside DIR)
//
// Journal: one JSON line per save, appended synchronously BEFORE saveCreds() is called, with
// exactly the text Baileys is about to write (JSON.stringify(creds, BufferJSON.replacer)):
//   {"run": "...", "seq": 12, "phase": "meant", "creds": {...}}
// and once saveCreds() resolved:
//   {"run": "...", "seq": 12, "phase": "saved"}
// so every creds.json content that can ever be whole on disk is in the journal even if the
// writer is killed between the write and the journal line. Nothing mutates creds while a save
// runs, so the file Baileys writes is byte for byte the "meant" text.
import { createHash, randomBytes } from 'node:crypto'
import { appendFileSync } from 'node:fs'
import {
	BufferJSON,
	getNextPreKeys,
	useMultiFileAuthState
} from '@whiskeysockets/baileys'

function parseArgs(argv) {
	const opts = { rate: 40, keys: 3, busyMs: 2, seconds: 0, journal: null, dir: null }
	for (let i = 0; i < argv.length; i++) {
		const a = argv[i]
		const next = () => {
			if (i + 1 >= argv.length) throw new Error(`${a} needs a value`)
			return argv[++i]
		}
		if (a === '--rate') opts.rate = Number(next())
		else if (a === '--keys') opts.keys = Number(next())
		else if (a === '--busy-ms') opts.busyMs = Number(next())
		else if (a === '--seconds') opts.seconds = Number(next())
		else if (a === '--journal') opts.journal = next()
		else if (a.startsWith('--')) throw new Error(`unknown option ${a}`)
		else if (opts.dir === null) opts.dir = a
		else throw new Error(`unexpected argument ${a}`)
	}
	if (!opts.dir) throw new Error('usage: writer.mjs DIR [--rate R] [--keys N] [--busy-ms M] [--seconds S] [--journal P]')
	if (!(opts.rate > 0)) throw new Error('--rate must be > 0')
	opts.journal ??= opts.dir.replace(/\/+$/, '') + '.journal'
	return opts
}

const opts = parseArgs(process.argv.slice(2))
const run = `${process.pid}-${Date.now()}`
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

// Keep the event loop busy the way a gateway's is: short synchronous bursts (hashing here)
// between turns, so the open(O_TRUNC) and the write() of one writeFile are several ms apart.
let stopping = false
let busyTurns = 0
function busy() {
	if (stopping || opts.busyMs <= 0) return
	const until = performance.now() + opts.busyMs
	let block = randomBytes(4096)
	while (performance.now() < until) block = createHash('sha256').update(block).digest()
	busyTurns++
	setImmediate(busy)
}

const contacts = Array.from({ length: 24 }, (_, i) => `1555010${String(i).padStart(4, '0')}`)
const groups = Array.from({ length: 6 }, (_, i) => `12036302${String(i).padStart(10, '0')}@g.us`)
const pick = list => list[Math.floor(Math.random() * list.length)]

// one key write of the kinds a connected socket makes all the time
function randomKeyWrite(tick) {
	const r = Math.random()
	if (r < 0.45) {
		// libsignal's SessionRecord.serialize(): a Uint8Array of a few KiB (the "session" type)
		const id = `${pick(contacts)}.${Math.random() < 0.8 ? 0 : 1}`
		return { session: { [id]: new Uint8Array(randomBytes(600 + Math.floor(Math.random() * 2500))) } }
	}
	if (r < 0.75) {
		// group sender keys: "<group>::<sender>::<device>" (':' becomes '-' in the file name)
		const id = `${pick(groups)}::${pick(contacts)}::0`
		return { 'sender-key': { [id]: new Uint8Array(randomBytes(300 + Math.floor(Math.random() * 900))) } }
	}
	if (r < 0.9) {
		const group = pick(groups)
		const memory = Object.fromEntries(contacts.slice(0, 1 + (tick % contacts.length)).map(c => [`${c}@s.whatsapp.net`, true]))
		return { 'sender-key-memory': { [group]: memory } }
	}
	const name = pick(['critical_block', 'critical_unblock_low', 'regular', 'regular_high', 'regular_low'])
	return {
		'app-state-sync-version': {
			[name]: { version: tick, hash: randomBytes(128), indexValueMap: { [randomBytes(8).toString('base64')]: { valueMac: randomBytes(32) } } }
		}
	}
}

async function main() {
	const { state, saveCreds } = await useMultiFileAuthState(opts.dir)
	const { creds, keys } = state
	// a paired-looking account, so restored creds are recognisable and not initAuthCreds()'
	if (!creds.me) {
		creds.me = { id: '15551230000:7@s.whatsapp.net', lid: '98765432100000:7@lid', name: 'harness' }
		creds.registered = true
		creds.platform = 'android'
	}
	creds.accountSyncCounter ??= 0
	const journal = (obj) => appendFileSync(opts.journal, JSON.stringify(obj) + '\n')

	busy()
	const started = Date.now()
	const interval = 1000 / opts.rate
	let seq = 0
	let consumed = 0
	let tick = 0
	const stop = () => { stopping = true }
	process.on('SIGTERM', stop)
	process.on('SIGINT', stop)
	while (!stopping && (opts.seconds <= 0 || Date.now() - started < opts.seconds * 1000)) {
		const tickStart = Date.now()
		tick++
		const writes = []
		// pre-keys: Baileys uploads a batch when the server runs low (getNextPreKeys writes them
		// and returns the creds update), and deletes each one a contact consumes (removePreKey)
		if (tick % 10 === 1) {
			const { update } = await getNextPreKeys(state, 5)
			Object.assign(creds, update)
		}
		if (tick % 3 === 0 && consumed + 1 < creds.nextPreKeyId - 5) {
			consumed++
			writes.push(keys.set({ 'pre-key': { [consumed]: null } }))
		}
		for (let k = 0; k < opts.keys; k++) writes.push(keys.set(randomKeyWrite(tick)))
		// a creds update (account sync, processed history, ...) and its save, concurrently with
		// the key writes, as sock.ev.on('creds.update', saveCreds) does
		creds.accountSyncCounter++
		creds.lastAccountSyncTimestamp = Math.floor(Date.now() / 1000)
		creds.processedHistoryMessages = [
			...creds.processedHistoryMessages.slice(-4),
			{ key: { remoteJid: `${pick(contacts)}@s.whatsapp.net`, fromMe: false, id: randomBytes(10).toString('hex').toUpperCase() }, messageTimestamp: creds.lastAccountSyncTimestamp }
		]
		seq++
		journal({ run, seq, phase: 'meant', creds: JSON.parse(JSON.stringify(creds, BufferJSON.replacer)) })
		writes.push(saveCreds().then(() => journal({ run, seq, phase: 'saved' })))
		await Promise.all(writes)
		const wait = interval - (Date.now() - tickStart)
		if (wait > 0) await sleep(wait)
	}
	stopping = true
	const seconds = (Date.now() - started) / 1000
	process.stderr.write(`writer: ${seq} creds saves, ${tick} ticks, ${busyTurns} busy turns in ${seconds.toFixed(1)} s\n`)
}

main().catch(err => {
	process.stderr.write(`writer: ${err?.stack || err}\n`)
	process.exit(1)
})
