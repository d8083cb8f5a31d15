// A child process serving FDServer with file-backed fds on argv[2] (a socket path), for tests that need the server
// in its own process (e.g. under `prlimit --nofile`). Options as JSON in argv[3]. Prints one JSON line per event:
// {"ready":true}, {"limits":...} (onLimits), {"fatal":"..."} (onFatal); stops cleanly on SIGTERM and exits 0.
import { FDServer } from '../../src/index'
import { FileFDSource } from '../../examples/file-fd-source'

const [sock, optsJson, filesDir] = process.argv.slice(2)
const opts = JSON.parse(optsJson ?? '{}') as Record<string, unknown>
const print = (o: unknown) => process.stdout.write(JSON.stringify(o) + '\n')
const server = new FDServer(sock, new FileFDSource(filesDir), {
  ...opts,
  limitsIntervalMs: 100,
  onLimits: (r) => print({ limits: r }),
  onFatal: (e) => print({ fatal: e.message }),
})
await server.serve()
print({ ready: true })
process.once('SIGTERM', () => {
  void server.stop().then(() => process.exit(0))
})
