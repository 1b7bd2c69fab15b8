#!/usr/bin/env bash
# Bake models into the image at build time: install-models.sh "URL1 URL2" "SHA1 SHA2".
# Each URL (or path) is installed into $CL_BIDSAPP_MODELS with its sha256 checked by
# cl-bidsapp-models; a missing, extra or wrong checksum fails the build. Then every model the
# image will offer (baked and bundled) is verified file by file against its card, so a broken
# model stops the build rather than a user's run. With no URLs only the bundled demo model is in
# the image.
set -euo pipefail
read -r -a urls <<< "${1:-}"
read -r -a sums <<< "${2:-}"
if [ "${#urls[@]}" -ne "${#sums[@]}" ]; then
  echo "install-models.sh: ${#urls[@]} model URL(s) but ${#sums[@]} sha256 value(s); give one" \
       "sha256 per URL (MODEL_URLS / MODEL_SHA256S build arguments)" >&2
  exit 64
fi
mkdir -p "${CL_BIDSAPP_MODELS:?CL_BIDSAPP_MODELS must name the models folder}"
for i in "${!urls[@]}"; do
  cl-bidsapp-models install "${urls[$i]}" --sha256 "${sums[$i]}"
done
listing=$(cl-bidsapp-models list)
echo "${listing}"
if [ "${listing}" != "no models installed" ]; then
  while read -r name _; do
    cl-bidsapp-models verify "${name}"
  done <<< "${listing}"
fi
