// Load a multi-file auth state directory the way a Baileys gateway does at start, and say
// whether everything in it loaded: prints one JSON document on stdout.
//
//   node load.mjs DIR
//
// {
//   "dir": DIR, "files": 57,
//   "creds_file": "ok" | "missing" | "empty" | "unparseable",
//   "fresh": false,          true when Baileys fell back to initAuthCreds() (new keys: the
//                            account would have to be paired again)
//   "creds": {...},          state.creds as Baileys loaded them (BufferJSON.replacer)
//   "keys": {"pre-key": 20, "session": 18, ...},   key files that loaded, per type
//   "failed": [{"file": "session-155501000003.0.json", "reason": "..."}],
//   "ok": true
// }
// Exit status 0 if every file loaded and the creds are the ones on disk, 1 otherwise, 2 on a
// usage error. Baileys' readData() turns an unreadable or unparseable file into null without a
// word, and useMultiFileAuthState() then uses initAuthCreds(): this script reads each file
// itself too, to tell "missing" from "torn".
import { readdirSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { BufferJSON, useMultiFileAuthState } from '@whiskeysockets/baileys'

// SignalDataTypeMap's keys (lib/Types/Auth.d.ts), longest first so "sender-key-memory" is not
// taken for "sender-key"
const KEY_TYPES = [
	'app-state-sync-version',
	'app-state-sync-key',
	'sender-key-memory',
	'identity-key',
	'lid-mapping',
	'device-list',
	'sender-key',
	'pre-key',
	'session',
	'tctoken'
]

const isBytes = v => Buffer.isBuffer(v) || v instanceof Uint8Array

// a loaded value of the right shape for its type (what Baileys' callers would use)
function shapeProblem(type, value) {
	if (value === null || value === undefined) return 'Baileys could not load it (readData returned null)'
	switch (type) {
		case 'pre-key':
			return isBytes(value.public) && isBytes(value.private) ? null : 'not a key pair'
		case 'session':
		case 'sender-key':
		case 'identity-key':
			return isBytes(value) ? null : 'not bytes'
		default:
			return typeof value === 'object' || typeof value === 'string' ? null : `unexpected ${typeof value}`
	}
}

function readRaw(path) {
	let text
	try {
		text = readFileSync(path, 'utf-8')
	} catch (err) {
		return { state: 'missing', error: err.code || String(err) }
	}
	if (text.length === 0) return { state: 'empty', error: '0 bytes' }
	try {
		return { state: 'ok', value: JSON.parse(text, BufferJSON.reviver) }
	} catch (err) {
		return { state: 'unparseable', error: `${err.message} (${text.length} bytes)` }
	}
}

const canonical = value => JSON.stringify(value, BufferJSON.replacer)

async function main() {
	const dir = process.argv[2]
	if (!dir || process.argv.length > 3) {
		process.stderr.write('usage: load.mjs DIR\n')
		process.exit(2)
	}
	let names
	try {
		if (!statSync(dir).isDirectory()) throw new Error('not a directory')
		names = readdirSync(dir).filter(n => statSync(join(dir, n)).isFile()).sort()
	} catch (err) {
		process.stdout.write(JSON.stringify({ dir, ok: false, error: `cannot list ${dir}: ${err.message}` }) + '\n')
		process.exit(1)
	}
	const failed = []
	const raw = readRaw(join(dir, 'creds.json'))
	if (raw.state !== 'ok') failed.push({ file: 'creds.json', reason: `${raw.state}: ${raw.error}` })

	const { state } = await useMultiFileAuthState(dir)
	// initAuthCreds() makes new random keys: loaded creds that differ from the file's are fresh
	const fresh = raw.state !== 'ok' || canonical(state.creds) !== canonical(raw.value)
	if (fresh && raw.state === 'ok') failed.push({ file: 'creds.json', reason: 'Baileys did not load the creds on disk' })

	const byType = new Map()
	for (const name of names) {
		if (name === 'creds.json') continue
		if (!name.endsWith('.json')) {
			failed.push({ file: name, reason: 'not a file useMultiFileAuthState writes' })
			continue
		}
		const type = KEY_TYPES.find(t => name.startsWith(`${t}-`))
		if (!type) {
			failed.push({ file: name, reason: 'unknown key type' })
			continue
		}
		// file names are already fixFileName()d ('/' -> '__', ':' -> '-'), which is idempotent,
		// so the id in the name reads back the same file
		const id = name.slice(type.length + 1, -'.json'.length)
		if (!byType.has(type)) byType.set(type, [])
		byType.get(type).push({ id, name })
	}
	const keys = {}
	for (const [type, entries] of byType) {
		const loaded = await state.keys.get(type, entries.map(e => e.id))
		let ok = 0
		for (const { id, name } of entries) {
			let problem = shapeProblem(type, loaded[id])
			if (problem && loaded[id] == null) {
				const r = readRaw(join(dir, name))
				if (r.state !== 'ok') problem = `${r.state}: ${r.error}`
			}
			if (problem) failed.push({ file: name, reason: problem })
			else ok++
		}
		keys[type] = ok
	}
	const summary = {
		dir,
		files: names.length,
		creds_file: raw.state,
		fresh,
		creds: JSON.parse(canonical(state.creds)),
		keys,
		failed,
		ok: failed.length === 0 && !fresh
	}
	process.stdout.write(JSON.stringify(summary) + '\n')
	process.exit(summary.ok ? 0 : 1)
}

main().catch(err => {
	process.stderr.write(`load: ${err?.stack || err}\n`)
	process.exit(1)
})
