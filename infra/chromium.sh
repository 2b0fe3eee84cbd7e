#!/usr/bin/env bash
# Headless Chromium for the browser tests, from the npm registry (no browser vendor download, which is offline here):
# @sparticuz/chromium ships a brotli-compressed Chromium build with the libraries it needs (NSS, swiftshader, a
# font). The tarball is checked against its pinned SHA-512, unpacked with node's brotli into DEST (default
# .venv/chromium), and the result answers --version. Needs node and npm (Debian's `nodejs` and `npm`).
set -euo pipefail
VERSION=153.0.0
SHA512=8e2196a92bcf31dbb8f8ff538a562a011ef21063c41c8371fa50af13f36a34efc41d8cc5ff1d615222394fa8a8548b7b744cbb9fcf1bcb24f4be4f9d9ec810c0
DEST=${1:-.venv/chromium}
if [ -x "$DEST/chromium" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then exit 0; fi
for tool in node npm; do
  command -v "$tool" >/dev/null || { echo "chromium.sh: $tool is missing (apt-get install nodejs npm)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching @sparticuz/chromium@$VERSION (headless Chromium for the browser tests) from the npm registry"
(cd "$work" && npm pack --silent "@sparticuz/chromium@$VERSION" >/dev/null)
tarball="$work/sparticuz-chromium-$VERSION.tgz"
actual=$(sha512sum "$tarball" | cut -d' ' -f1)
if [ "$actual" != "$SHA512" ]; then
  echo "chromium.sh: $tarball has SHA-512 ${actual:0:16}…, expected ${SHA512:0:16}…" >&2; exit 1
fi
tar xzf "$tarball" -C "$work"
rm -rf "$DEST.partial" && mkdir -p "$DEST.partial"
node -e '
const fs = require("fs"), zlib = require("zlib"), [src, dst] = process.argv.slice(1);
for (const f of fs.readdirSync(src)) if (f.endsWith(".br"))
  fs.writeFileSync(dst + "/" + f.slice(0, -3), zlib.brotliDecompressSync(fs.readFileSync(src + "/" + f)));
' "$work/package/bin" "$DEST.partial"
for archive in "$DEST.partial"/*.tar; do tar xf "$archive" -C "$DEST.partial" && rm "$archive"; done
chmod +x "$DEST.partial/chromium"
# its fonts.conf names Lambda's folders (/tmp/fonts, …); without a font Skia aborts on the first page with text
dest_abs=$(cd "$(dirname "$DEST")" && pwd)/$(basename "$DEST")
cat > "$DEST.partial/fonts.conf" <<CONF
<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "fonts.dtd">
<fontconfig>
  <dir>$dest_abs/fonts</dir>
  <cachedir>$dest_abs/fonts-cache</cachedir>
</fontconfig>
CONF
echo "$VERSION" > "$DEST.partial/VERSION"
LD_LIBRARY_PATH="$DEST.partial/lib:$DEST.partial" "$DEST.partial/chromium" --version
rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
