// An independent SPDY/3.1 client for huskd's streaming tests, built on npm's spdy-transport
// (node's SPDY implementation, unrelated to husk's). Prints one JSON object on stdout.
//   node spdy_client.js exec URL PROTOCOL STDIN_TEXT|@N|-   -> {stdout, stderr, error, protocol}
//   node spdy_client.js exec-tty URL PROTOCOL RESIZE_JSON   -> {stdout, error, protocol}
//   node spdy_client.js portforward URL PORT PAYLOAD N      -> {echoes: [..N], errors: [..N]}
//   node spdy_client.js session URL PROTOCOL FLAGS STEPS    -> {stdout, stderr, error, protocol}
//     an interactive exec or attach: FLAGS is a comma list of stdin,stdout,stderr,tty (the
//     streams opened, as kubectl opens them); STEPS a JSON list run in order:
//     {"send": TEXT} to stdin, {"expect": TEXT} waits until stdout holds TEXT after the
//     previous expect's match, {"resize": {"Width": W, "Height": H}}, {"sleep": MS},
//     {"end": true} ends stdin, {"hangup": true} drops the connection at once (no FIN, no
//     GOAWAY) and prints what came so far.
//   node spdy_client.js http URL PORT PATH_PREFIX N         -> {responses: [..N], errors: [..N]}
//     (N forwarded connections at once, each `GET <PATH_PREFIX><i> HTTP/1.0`)
// SPDY_CLIENT_TIMEOUT_MS overrides the 20 s limit on the whole run.
'use strict';
const net = require('net');
const transport = require(process.env.SPDY_TRANSPORT || 'spdy-transport');

function fail(msg) {
  process.stderr.write(`spdy_client: ${msg}\n`);
  reported = true;
  process.exit(2);
}
const LIMIT = Number(process.env.SPDY_CLIENT_TIMEOUT_MS || 20000);
let soFar = ''; // a session's stdout, for the timeout's message
let reported = false;
// Node exits on its own when nothing is left to wait for (the server closed the connection
// while a step still waited): that is a failure, said so, never a silent success.
process.on('exit', () => {
  if (!reported) {
    process.stderr.write(`spdy_client: the connection ended early; stdout so far: ${JSON.stringify(soFar)}\n`);
    process.exitCode = 3;
  }
});
setTimeout(() => fail(`timed out after ${LIMIT} ms; stdout so far: ${JSON.stringify(soFar)}`), LIMIT).unref();

// The HTTP/1.1 upgrade, by hand: spdy-transport speaks SPDY on a socket, not the upgrade.
function upgrade(url, protocols) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const sock = net.connect(Number(u.port), u.hostname);
    let buf = Buffer.alloc(0);
    const onData = (d) => {
      buf = Buffer.concat([buf, d]);
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      sock.removeListener('data', onData);
      sock.pause();
      const head = buf.slice(0, end).toString();
      const rest = buf.slice(end + 4);
      const status = Number(head.split(' ')[1]);
      if (status !== 101) return reject(new Error(`upgrade refused: ${head}`));
      const m = /x-stream-protocol-version:\s*(\S+)/i.exec(head);
      if (rest.length) sock.unshift(rest);
      resolve({ sock, protocol: m ? m[1] : '' });
    };
    sock.on('data', onData);
    sock.on('error', reject);
    sock.write(
      `POST ${u.pathname} HTTP/1.1\r\nHost: ${u.host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n` +
        protocols.map((p) => `X-Stream-Protocol-Version: ${p}\r\n`).join('') +
        '\r\n'
    );
  });
}

function connect(sock) {
  const conn = transport.connection.create(sock, { protocol: 'spdy', isServer: false });
  conn.on('error', () => {}); // the server closes the connection when the exec ends
  conn.start(3.1);
  return conn;
}

function open(conn, headers) {
  return new Promise((resolve, reject) => {
    conn.request({ method: 'POST', path: '/', host: 'husk', headers }, (err, stream) => {
      if (err) return reject(err);
      stream.on('error', () => {});
      resolve(stream);
    });
  });
}

function collect(stream) {
  return new Promise((resolve) => {
    const parts = [];
    stream.on('data', (d) => parts.push(d));
    stream.on('end', () => resolve(Buffer.concat(parts)));
    stream.on('close', () => resolve(Buffer.concat(parts)));
  });
}

async function exec(url, protocol, stdinText) {
  const { sock, protocol: chosen } = await upgrade(url, [protocol]);
  const conn = connect(sock);
  // The order kubectl uses: error first, then the standard streams.
  const error = await open(conn, { streamtype: 'error' });
  const errorP = collect(error);
  let stdin = null;
  if (stdinText !== '-') stdin = await open(conn, { streamtype: 'stdin' });
  const stdout = await open(conn, { streamtype: 'stdout' });
  const stdoutP = collect(stdout);
  const stderr = await open(conn, { streamtype: 'stderr' });
  const stderrP = collect(stderr);
  if (stdin) {
    // "@N": N bytes of 'x' (more than argv could carry), to push past the 64 KiB windows.
    const m = /^@(\d+)$/.exec(stdinText);
    stdin.end(m ? Buffer.alloc(Number(m[1]), 'x') : stdinText);
  }
  const [out, err, status] = await Promise.all([stdoutP, stderrP, errorP]);
  process.stdout.write(
    JSON.stringify({
      protocol: chosen,
      stdout: out.toString(),
      stdout_len: out.length,
      stderr: err.toString(),
      error: status.toString(),
    }),
    // exit only once the pipe took it all (a large stdout is written asynchronously)
    () => {
      reported = true;
      process.exit(0);
    }
  );
}

// A tty exec: error, stdout and resize streams (no stderr with a tty), one size sent.
async function execTty(url, protocol, resize) {
  const { sock, protocol: chosen } = await upgrade(url, [protocol]);
  const conn = connect(sock);
  const error = await open(conn, { streamtype: 'error' });
  const errorP = collect(error);
  const stdout = await open(conn, { streamtype: 'stdout' });
  const stdoutP = collect(stdout);
  const resizeStream = await open(conn, { streamtype: 'resize' });
  resizeStream.write(resize + '\n');
  const [out, status] = await Promise.all([stdoutP, errorP]);
  process.stdout.write(
    JSON.stringify({ protocol: chosen, stdout: out.toString(), error: status.toString() }),
    () => {
      reported = true;
      process.exit(0);
    }
  );
}

async function portforward(url, port, payload, n) {
  const { sock, protocol } = await upgrade(url, ['portforward.k8s.io']);
  if (protocol !== 'portforward.k8s.io') fail(`negotiated ${protocol}`);
  const conn = connect(sock);
  // n forwarded connections at once on one SPDY connection, as kubectl multiplexes them.
  const runs = [];
  for (let i = 0; i < n; i++) {
    runs.push(
      (async () => {
        const error = await open(conn, { streamtype: 'error', port: String(port), requestid: String(i) });
        const errorP = collect(error);
        const data = await open(conn, { streamtype: 'data', port: String(port), requestid: String(i) });
        const dataP = collect(data);
        data.end(`${payload}-${i}`);
        const [echo, err] = await Promise.all([dataP, errorP]);
        return { echo: echo.toString(), error: err.toString() };
      })()
    );
  }
  const res = await Promise.all(runs);
  process.stdout.write(
    JSON.stringify({ echoes: res.map((r) => r.echo), errors: res.map((r) => r.error) }),
    () => {
      reported = true;
      process.exit(0);
    }
  );
}

async function session(url, protocol, flags, steps) {
  const want = new Set(flags.split(',').filter((f) => f));
  const { sock, protocol: chosen } = await upgrade(url, [protocol]);
  const conn = connect(sock);
  const error = await open(conn, { streamtype: 'error' });
  const errorP = collect(error);
  const stdin = want.has('stdin') ? await open(conn, { streamtype: 'stdin' }) : null;
  let out = Buffer.alloc(0);
  let err = Buffer.alloc(0);
  const waiters = [];
  const wake = () => waiters.splice(0).forEach((w) => w());
  let outP = Promise.resolve();
  if (want.has('stdout')) {
    const stdout = await open(conn, { streamtype: 'stdout' });
    stdout.on('data', (d) => {
      out = Buffer.concat([out, d]);
      soFar = out.toString();
      wake();
    });
    outP = new Promise((r) => {
      stdout.on('end', r);
      stdout.on('close', r);
    });
  }
  if (want.has('stderr') && !want.has('tty')) {
    const stderr = await open(conn, { streamtype: 'stderr' });
    stderr.on('data', (d) => (err = Buffer.concat([err, d])));
  }
  const resize = want.has('tty') ? await open(conn, { streamtype: 'resize' }) : null;
  const report = (status) =>
    process.stdout.write(
      JSON.stringify({
        protocol: chosen,
        stdout: out.toString(),
        stderr: err.toString(),
        error: status,
      }),
      () => {
      reported = true;
      process.exit(0);
    }
    );
  let from = 0;
  for (const step of JSON.parse(steps)) {
    if (step.send !== undefined) stdin.write(step.send);
    else if (step.resize !== undefined) resize.write(JSON.stringify(step.resize) + '\n');
    else if (step.sleep !== undefined) await new Promise((r) => setTimeout(r, step.sleep));
    else if (step.end) stdin.end();
    else if (step.expect !== undefined) {
      for (;;) {
        const at = out.indexOf(step.expect, from);
        if (at >= 0) {
          from = at + step.expect.length;
          break;
        }
        await new Promise((r) => waiters.push(r));
      }
    } else if (step.hangup) {
      sock.destroy();
      return report(null);
    } else fail(`unknown step ${JSON.stringify(step)}`);
  }
  const [status] = await Promise.all([errorP, outP]);
  report(status.toString());
}

// n HTTP/1.0 requests at once through port-forward streams of one connection; each
// request half-closes its data stream, and the response ends with the server's close.
async function http(url, port, prefix, n) {
  const { sock, protocol } = await upgrade(url, ['portforward.k8s.io']);
  if (protocol !== 'portforward.k8s.io') fail(`negotiated ${protocol}`);
  const conn = connect(sock);
  const runs = [];
  for (let i = 0; i < n; i++) {
    runs.push(
      (async () => {
        const headers = { port: String(port), requestid: String(i) };
        const error = await open(conn, { streamtype: 'error', ...headers });
        const errorP = collect(error);
        const data = await open(conn, { streamtype: 'data', ...headers });
        const dataP = collect(data);
        data.end(`GET ${prefix}${i} HTTP/1.0\r\nHost: pod\r\n\r\n`);
        const [resp, err] = await Promise.all([dataP, errorP]);
        return { resp: resp.toString(), error: err.toString() };
      })()
    );
  }
  const res = await Promise.all(runs);
  process.stdout.write(
    JSON.stringify({ responses: res.map((r) => r.resp), errors: res.map((r) => r.error) }),
    () => {
      reported = true;
      process.exit(0);
    }
  );
}

const [mode, url, a, b, c] = process.argv.slice(2);
const run =
  mode === 'exec'
    ? exec(url, a, b)
    : mode === 'exec-tty'
      ? execTty(url, a, b)
      : mode === 'session'
        ? session(url, a, b, c)
      : mode === 'http'
        ? http(url, Number(a), b, Number(c || 1))
        : portforward(url, Number(a), b, Number(c || 1));
run.catch((e) => fail(e.stack || String(e)));
