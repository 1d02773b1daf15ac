#!/usr/bin/env bash
# Vendors the API reference UI served at /docs from its npm package, so the
# page works without internet access. Usage: scripts/vendor-scalar.sh VERSION
# (then point host/src/api/docs.rs at the new file and update LICENSE).
source "$(dirname "$0")/lib.sh"
version="${1:?usage: scripts/vendor-scalar.sh VERSION}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@scalar/api-reference@$version" >/dev/null && tar xzf ./*.tgz)
grep -q '"license": "MIT"' "$work/package/package.json"
dest="$FERRY_ROOT/host/assets/scalar"
# The old file goes only once the new one is in place: docs.rs includes it,
# and a package that moved its bundle would leave the tree not building.
cp "$work/package/dist/browser/standalone.js" "$work/scalar-$version.js"
find "$dest" -name 'scalar-*.js' ! -name "scalar-$version.js" -delete
mv "$work/scalar-$version.js" "$dest/scalar-$version.js"
sha256sum "$dest/scalar-$version.js"
