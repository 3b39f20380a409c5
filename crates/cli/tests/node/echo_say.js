#!/usr/bin/env node
// One call of portcullis.demo.v1.Echo/Say from a standard gRPC client (Node.js @grpc/grpc-js,
// the proto loaded from proto/portcullis/demo/v1/echo.proto with @grpc/proto-loader), with mTLS
// and a device certificate, as an outside client would make it: plain gRPC over ALPN h2, no
// Portcullis Prefix. Used by crates/cli/tests/grpcjs.rs.
//
//     node echo_say.js --target 127.0.0.1:50051 --ca ca.pem \
//         --cert devices/laptop.pem --key devices/laptop-key.pem [--text hello]
//     node echo_say.js --target 127.0.0.1:50051 --plaintext   # no TLS (h2c), as a mistake
//     node echo_say.js --probe                                # are the modules installed?
//
// Prints one JSON line and exits 0 whether the call succeeded or not:
//     {"ok": true, "reply": {"text": ..., "user": ..., "device": ..., "auth_method": ...}}
//     {"ok": false, "code": "UNAUTHENTICATED", "details": "...", "metadata": {...}}
// --probe prints {"ok": true, "grpc-js": VERSION, "proto-loader": VERSION}.
// Exits 2 when @grpc/grpc-js or @grpc/proto-loader cannot be loaded (run `npm ci` here), and
// 64 on bad arguments.

'use strict';

const fs = require('fs');
const path = require('path');

function usage(message) {
  process.stderr.write(`echo_say.js: ${message}\n`);
  process.exit(64);
}

function parseArgs(argv) {
  const args = {
    target: null,
    ca: null,
    cert: null,
    key: null,
    plaintext: false,
    probe: false,
    serverName: 'localhost',
    text: 'hello',
    timeout: 15,
    protoRoot: path.resolve(__dirname, '..', '..', '..', '..', 'proto'),
  };
  const valued = {
    '--target': 'target',
    '--ca': 'ca',
    '--cert': 'cert',
    '--key': 'key',
    '--server-name': 'serverName',
    '--text': 'text',
    '--timeout': 'timeout',
    '--proto-root': 'protoRoot',
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === '--plaintext') {
      args.plaintext = true;
    } else if (flag === '--probe') {
      args.probe = true;
    } else if (Object.prototype.hasOwnProperty.call(valued, flag)) {
      if (i + 1 >= argv.length) usage(`${flag} needs a value`);
      args[valued[flag]] = argv[++i];
    } else {
      usage(`unknown argument ${flag}`);
    }
  }
  args.timeout = Number(args.timeout);
  if (!(args.timeout > 0)) usage('--timeout must be a positive number of seconds');
  if (!args.probe) {
    if (!args.target) usage('--target is required');
    if (!args.plaintext && !(args.ca && args.cert && args.key)) {
      usage('--ca, --cert and --key are required unless --plaintext is given');
    }
  }
  return args;
}

function print(value) {
  process.stdout.write(JSON.stringify(value) + '\n');
}

function main() {
  const args = parseArgs(process.argv.slice(2));

  let grpc;
  let protoLoader;
  try {
    grpc = require('@grpc/grpc-js');
    protoLoader = require('@grpc/proto-loader');
  } catch (e) {
    print({ ok: false, code: 'IMPORT_ERROR', details: String(e && e.message ? e.message : e) });
    process.exitCode = 2;
    return;
  }
  if (args.probe) {
    print({
      ok: true,
      'grpc-js': require('@grpc/grpc-js/package.json').version,
      'proto-loader': require('@grpc/proto-loader/package.json').version,
    });
    return;
  }

  const definition = protoLoader.loadSync('portcullis/demo/v1/echo.proto', {
    includeDirs: [args.protoRoot],
    keepCase: true,
    defaults: true,
  });
  const Echo = grpc.loadPackageDefinition(definition).portcullis.demo.v1.Echo;

  let credentials;
  const options = {};
  if (args.plaintext) {
    credentials = grpc.credentials.createInsecure();
  } else {
    credentials = grpc.credentials.createSsl(
      fs.readFileSync(args.ca),
      fs.readFileSync(args.key),
      fs.readFileSync(args.cert),
    );
    options['grpc.ssl_target_name_override'] = args.serverName;
    options['grpc.default_authority'] = args.serverName;
  }
  const client = new Echo(args.target, credentials, options);
  const deadline = new Date(Date.now() + args.timeout * 1000);
  client.Say({ text: args.text }, { deadline }, (err, reply) => {
    if (err) {
      const metadata = {};
      const map = err.metadata ? err.metadata.getMap() : {};
      for (const [k, v] of Object.entries(map)) {
        metadata[k] = Buffer.isBuffer(v) ? v.toString('base64') : v;
      }
      print({
        ok: false,
        code: grpc.status[err.code] || String(err.code),
        details: err.details,
        metadata,
      });
    } else {
      print({
        ok: true,
        reply: {
          text: reply.text,
          user: reply.user,
          device: reply.device,
          auth_method: reply.auth_method,
        },
      });
    }
    client.close();
  });
}

main();
