#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM pod slice (e.g. v4-32), one process per host.
# Each host calls jax.distributed.initialize() (--multihost), decodes only its rows of every
# global batch in Grain worker processes, and places them on its own devices. A preemption
# (SIGTERM) on any worker makes all of them save the same step; rerun the script to resume.
#
# Usage: TPU_NAME=my-pod ZONE=us-central2-b REPO=https://.../dirac_jax.git \
#          launch/tpu_pod.sh configs/imagenet_dirac.py gs://BUCKET/runs/diracnet18 \
#          --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets --config.dataset.num_workers=96
# data_dir holds imagenet2012 built once as ArrayRecord (README, "ImageNet"); the workdir and
# data_dir must be on storage every worker can reach (a GCS bucket); each host installs the
# project with its gcs extra (gcsfs, google-cloud-storage) for that.
set -euo pipefail
CONFIG="${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}"
WORKDIR="${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}"
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${REPO:?set REPO (git URL of dirac_jax)}"
BRANCH="${BRANCH:-main}"
OVERRIDES="$*"

read -r -d '' REMOTE <<EOS || true
set -euo pipefail
if [ ! -d dirac_jax ]; then git clone -q --branch $BRANCH $REPO dirac_jax; fi
cd dirac_jax && git fetch -q && git checkout -q $BRANCH && git pull -q
python3 -m venv .venv && . .venv/bin/activate
pip install -q -U pip && pip install -q -e '.[gcs]' 'jax[tpu]'
python -m dirac_jax.main --multihost --config=$CONFIG --workdir=$WORKDIR $OVERRIDES
EOS

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$REMOTE"
