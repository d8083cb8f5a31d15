// Every error text of PROTOCOL.md, byte for byte, as a raw client sees it; the stable codes FDClient maps them to;
// bounded echo of hostile payloads; deeply nested JSON; keys that are not valid UTF-8.
import test from 'ava'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FDServer, FDClient, ServerError, type FDSource, type RequestLogEntry } from '../src/index'
import { UnixConnection } from '../src/native'
import { serverErrorCode, type ErrorCode } from '../src/errors'
import { parseGetFDPayload } from '../src/payloads'
import { until } from './helpers/env'

/** A source that refuses to recover (with a fixed message) and adds keys without fds. */
class ScriptedSource implements FDSource {
  getFDs(_key: string, data: Buffer) {
    if (data.toString() === 'fail') throw new Error('plugin said no')
    // Parsing the payload is where hostile JSON goes (as TapFDSource does).
    if (data.length > 2) parseGetFDPayload(data)
    return { fds: [], data: Buffer.from('ok') }
  }
  release() {}
  getInfo() {
    return Buffer.alloc(0)
  }
  recover(_key: string, data: Buffer) {
    throw new Error(`cannot recover from ${data.length} bytes`)
  }
  retrieveFDs() {
    return []
  }
  stop() {}
}

async function withServer(t: { teardown: (f: () => Promise<void>) => void }, log?: RequestLogEntry[]) {
  const dir = mkdtempSync(join(tmpdir(), `tm-err-${process.pid}-`))
  const sock = join(dir, 'fd.sock')
  const server = new FDServer(sock, new ScriptedSource(), log ? { onRequest: (e) => log.push(e) } : {})
  await server.serve()
  t.teardown(async () => {
    await server.stop()
    rmSync(dir, { recursive: true, force: true })
  })
  return { sock, server, client: new FDClient(sock) }
}

function header(cmd: number, key: Buffer | string, dataSize = 0): Buffer {
  const k = Buffer.isBuffer(key) ? key : Buffer.from(key)
  const b = Buffer.alloc(77, 0x20)
  b.writeUInt32BE(0x42424242, 0)
  b[4] = cmd
  b.writeUInt32BE(dataSize, 5)
  b.writeUInt32BE(0, 9)
  k.copy(b, 13)
  return b
}

/** Sends one raw request and returns the raw response: command byte, key bytes and payload bytes. */
async function raw(sock: string, request: Buffer): Promise<{ command: number; key: Buffer; data: Buffer }> {
  const c = await UnixConnection.connect(sock)
  try {
    await c.write(request)
    const f = await c.readResponseFrame(10_000)
    return { command: f.header[4], key: f.header.subarray(13), data: f.data ?? Buffer.alloc(0) }
  } finally {
    c.close()
  }
}

const NUL_KEY = Buffer.alloc(64, 0)

/** An error response carrying exactly `text` (command 0xff, a key of 64 NULs, DataSize = its UTF-8 length). */
function assertError(t: import('ava').ExecutionContext, r: { command: number; key: Buffer; data: Buffer }, text: string) {
  t.is(r.command, 0xff)
  t.deepEqual(r.key, NUL_KEY)
  t.deepEqual(r.data, Buffer.from(text, 'utf8'))
}

test('each error text of PROTOCOL.md, byte for byte (Go %q quoting)', async (t) => {
  const { sock } = await withServer(t)
  // get / release of an unknown key
  assertError(t, await raw(sock, header(2, 'no "such" key')), 'bad fd key: "no \\"such\\" key"')
  assertError(t, await raw(sock, header(1, 'gone')), 'bad fd key: "gone"')
  // duplicate add
  const add = Buffer.concat([header(0, 'k1', 2), Buffer.from('{}')])
  t.is((await raw(sock, add)).command, 0x80)
  assertError(t, await raw(sock, add), 'fd key already exists: "k1"')
  // recover of a present key, recover whose source fails (Virtlet: error recovering "<key>": <msg>)
  assertError(t, await raw(sock, Buffer.concat([header(3, 'k1', 2), Buffer.from('{}')])), 'fd key "k1" is already present and thus can\'t be properly recovered')
  assertError(t, await raw(sock, Buffer.concat([header(3, 'r\t1', 3), Buffer.from('abc')])), 'error recovering "r\\t1": cannot recover from 3 bytes')
  // a failing add
  assertError(t, await raw(sock, Buffer.concat([header(0, 'k2', 4), Buffer.from('fail')])), 'error getting fd: plugin said no')
  // unknown command
  assertError(t, await raw(sock, header(9, 'k1')), 'bad command')
})

test('FDClient maps the known error texts to stable codes and keeps the text', async (t) => {
  const { client } = await withServer(t)
  await client.addFDs('a', {})
  const cases: [Promise<unknown>, ErrorCode, string][] = [
    [client.getFDs('nope'), 'ERR_NOT_FOUND', 'server returned error: bad fd key: "nope"'],
    [client.releaseFDs('nope'), 'ERR_NOT_FOUND', 'server returned error: bad fd key: "nope"'],
    [client.addFDs('a', {}), 'ERR_EXISTS', 'server returned error: fd key already exists: "a"'],
    [client.recover('a', {}), 'ERR_EXISTS', 'server returned error: fd key "a" is already present and thus can\'t be properly recovered'],
    [client.addFDs('big', Buffer.alloc(65 * 1024, 0x41)), 'ERR_TOO_LARGE', 'server returned error: request data size 66560 exceeds the limit of 65536 bytes'],
    [client.addFDs('deep', Buffer.from('['.repeat(60_000))), 'ERR_INVALID', ''],
    [client.recover('r', {}), 'ERR_SERVER', 'server returned error: error recovering "r": cannot recover from 2 bytes'],
  ]
  for (const [p, code, message] of cases) {
    const err = await t.throwsAsync(p, { instanceOf: ServerError })
    t.is(err?.code, code, err?.message)
    if (message) t.is(err?.message, message)
  }
  // Texts of Virtlet's Go server and of timeouts map the same way.
  t.is(serverErrorCode('error getting fd: bridge timed out after 30000 ms and was killed'), 'ERR_TIMEOUT')
  t.is(serverErrorCode('permission denied: peer uid 1 gid 1 is not allowed'), 'ERR_PERMISSION')
  t.is(serverErrorCode('bad command'), 'ERR_UNSUPPORTED')
  t.is(serverErrorCode('something else'), 'ERR_SERVER')
})

test('error responses and log entries echo at most a bounded part of a hostile payload', async (t) => {
  const log: RequestLogEntry[] = []
  const { sock } = await withServer(t, log)
  // A valid JSON object whose bad field is a 60 KiB string: the message names it, cut short.
  const payload = Buffer.from(JSON.stringify({ podNetworkDesc: { podId: 'x'.repeat(60_000) } }))
  const r = await raw(sock, Buffer.concat([header(0, 'hostile', payload.length), payload]))
  t.is(r.command, 0xff)
  t.true(r.data.length < 1200, `error response of ${r.data.length} bytes`)
  t.regex(r.data.toString(), /^error getting fd: GetFDPayload\.podNetworkDesc\.podId: "x+\.\.\. is not a valid pod id/)
  // Whatever the source says, an error response is capped.
  // The entry is logged once the response was written (it may land just after the client read it).
  await until(() => log.some((e) => e.key === 'hostile'), 5_000)
  const entry = log.find((e) => e.key === 'hostile')
  t.truthy(entry)
  t.true((entry?.error?.length ?? 0) < 1200)
})

test('deeply nested JSON gets a clear "too deeply nested" error and the server goes on', async (t) => {
  const { client } = await withServer(t)
  for (const doc of ['['.repeat(60_000), '{"a":'.repeat(12_000), `{"podNetworkDesc":${'['.repeat(70)}${']'.repeat(70)}}`]) {
    const err = await t.throwsAsync(client.addFDs('deep', Buffer.from(doc)), { instanceOf: ServerError })
    t.regex(err!.message, /too deeply nested/)
    t.notRegex(err!.message, /call stack/)
  }
  t.is((await client.addFDs('fine', {})).toString(), 'ok')
})

test('keys that are not valid UTF-8 are refused and never alias each other', async (t) => {
  const { sock, client } = await withServer(t)
  // Two keys that differ only in invalid bytes (a lossy decoder makes both "k\ufffd").
  const k1 = Buffer.concat([Buffer.from('k'), Buffer.from([0xff])])
  const k2 = Buffer.concat([Buffer.from('k'), Buffer.from([0xfe])])
  const add = (k: Buffer) => Buffer.concat([header(0, k, 2), Buffer.from('{}')])
  assertError(t, await raw(sock, add(k1)), 'fd key is not valid UTF-8: "k\\xff"')
  assertError(t, await raw(sock, add(k2)), 'fd key is not valid UTF-8: "k\\xfe"')
  // Nothing was added under either, nor under the lossy name.
  assertError(t, await raw(sock, header(2, k1)), 'fd key is not valid UTF-8: "k\\xff"')
  const err = await t.throwsAsync(client.getFDs('k\ufffd'), { instanceOf: ServerError })
  t.is(err?.code, 'ERR_NOT_FOUND')
  // The connection stays usable after the refusal, as after any error response.
  const c = await UnixConnection.connect(sock)
  try {
    await c.write(add(k1))
    t.is((await c.readResponseFrame(10_000)).header[4], 0xff)
    await c.write(Buffer.concat([header(0, 'valid', 2), Buffer.from('{}')]))
    t.is((await c.readResponseFrame(10_000)).header[4], 0x80)
  } finally {
    c.close()
  }
})

test('allowedUids/allowedGids outside u32 are refused (they would wrap around natively)', (t) => {
  for (const opts of [{ allowedUids: [4294967297] }, { allowedGids: [-1] }, { allowedUids: [1.5] }, { allowedGids: [Number.NaN] }]) {
    t.throws(() => new FDServer('/nonexistent/fd.sock', new ScriptedSource(), opts), { code: 'ERR_INVALID', message: /u32/ })
  }
})

test('spinUs outside 0..1000 or not an integer is refused; 0 and 1000 are taken', (t) => {
  for (const spinUs of [-1, 1001, 2.5, Number.NaN]) {
    t.throws(() => new FDServer('/nonexistent/fd.sock', new ScriptedSource(), { spinUs }), { code: 'ERR_INVALID', message: /^spinUs must be an integer from 0 to 1000/ })
  }
  for (const spinUs of [0, 1000]) t.notThrows(() => new FDServer('/nonexistent/fd.sock', new ScriptedSource(), { spinUs }))
})
