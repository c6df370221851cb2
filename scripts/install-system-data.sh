#!/usr/bin/env bash
# Fashion-MNIST ships as a Debian package (the default image task). Install it when we can (root
# with apt); otherwise say how, and the image-task tests that need it are skipped with that reason.
set -u
if [ -d /usr/share/datasets/fashion-mnist ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tasks will be unavailable"
else
  echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the Fashion-MNIST image task"
fi
exit 0
