// Encodes texts with the reference JavaScript GPT-2 encoder (npm gpt-3-encoder).
//
//   node js_encode.js TEXTS.json [ENCODER_JS]     prints a JSON list of id lists, one per text
//   node js_encode.js --bench TEXT.txt [ENCODER_JS]
//       encodes each line of TEXT.txt (split on "\n"), timing only the encode calls, and prints
//       JSON {"seconds", "bytes", "mb_per_s", "n_ids", "checksum"}; checksum is the sum over all
//       ids of (position + 1) * (id + 1) modulo 2^61 - 1, over the flat id sequence.
//
// ENCODER_JS defaults to $BIASTRANSFER_FIXTURES/gpt-3-encoder/package/Encoder.js, else
// <repo>/.cache/fixtures/gpt-3-encoder/package/Encoder.js.
'use strict';
const fs = require('fs');
const path = require('path');

function encoderPath(arg) {
  if (arg) return path.resolve(arg);
  const fixtures = process.env.BIASTRANSFER_FIXTURES ||
      path.join(__dirname, '..', '..', '.cache', 'fixtures');
  return path.join(fixtures, 'gpt-3-encoder', 'package', 'Encoder.js');
}

const MOD = 2n ** 61n - 1n;

function main(argv) {
  const bench = argv[0] === '--bench';
  const args = bench ? argv.slice(1) : argv;
  if (args.length < 1) {
    process.stderr.write('usage: node js_encode.js [--bench] INPUT [ENCODER_JS]\n');
    process.exit(2);
  }
  const {encode} = require(encoderPath(args[1]));
  if (!bench) {
    const texts = JSON.parse(fs.readFileSync(args[0], 'utf-8'));
    process.stdout.write(JSON.stringify(texts.map(t => encode(t))) + '\n');
    return;
  }
  const buffer = fs.readFileSync(args[0]);
  const lines = buffer.toString('utf-8').split('\n');
  const results = new Array(lines.length);
  const start = process.hrtime.bigint();
  for (let i = 0; i < lines.length; i++) results[i] = encode(lines[i]);
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  let checksum = 0n;
  let position = 0n;
  for (const ids of results) {
    for (const id of ids) {
      position += 1n;
      checksum = (checksum + position * BigInt(id + 1)) % MOD;
    }
  }
  process.stdout.write(JSON.stringify({
    seconds,
    bytes: buffer.length,
    mb_per_s: buffer.length / 1e6 / seconds,
    n_ids: Number(position),
    checksum: checksum.toString(),
  }) + '\n');
}

main(process.argv.slice(2));
