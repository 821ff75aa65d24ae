#!/bin/bash
# hpsearch on a Slurm cluster: a job array whose tasks are all workers of ONE study kept in a
# PostgreSQL database.
#
#   export HPSEARCH_STORAGE='postgresql://hpsearch:PASSWORD@db.example.org:5432/hpsearch'
#   sbatch examples/slurm-array.sh          # sbatch passes your environment on to the tasks
#
# The storage URL is postgresql://USER:PASSWORD@HOST:PORT/DATABASE, a database every node can
# reach. hpsearch talks to it through psycopg 3: pip install 'hpsearch[postgres]' (or
# 'psycopg[binary]'); postgresql+psycopg://... means the same. Create the empty database once
# (createdb -O hpsearch hpsearch): the first task creates Optuna's tables and the study, the
# others join it. To keep the password out of the URL, write postgresql://hpsearch@HOST/hpsearch
# and put the password in ~/.pgpass, which the driver reads. hpsearch never prints it.
#
# --trials counts the finished trials of the study, for ALL tasks together: 8 tasks with
# --trials 200 give 200 trials, not 1600. A task asks for a trial only while the study needs one,
# waits for the others' last trials, and exits 0 when the study holds 200. Resubmitting the same
# script continues the study where it stands (and a task that starts on a full study exits at once).
# A task that dies (a lost node, preemption) leaves its trial to the others, which run it again
# with the same seed after 90 s without a heartbeat. At the time limit Slurm sends SIGTERM: the
# task marks its trial failed and queued, so the next run takes it first.
#
# The weights of the study's best trials are kept in studies/artifacts/ under the folder a task
# runs in (the submit folder, on a shared file system): run `hpsearch report`, `export` and
# `predict` from that folder and they use them without training again.
#
#SBATCH --job-name=hpsearch
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=hpsearch-%A_%a.log

set -euo pipefail
: "${HPSEARCH_STORAGE:?export HPSEARCH_STORAGE=postgresql://USER:PASSWORD@HOST:5432/DATABASE before sbatch}"
# Fashion-MNIST on a shared file system, fetched once before submitting so that the tasks do not
# all download it at the same moment:
#   mkdir -p data && python -c "from hpsearch.data import locate; locate('fashion-mnist', 'data')"
DATA_DIR=${HPSEARCH_DATA_DIR:-${SLURM_SUBMIT_DIR:-.}/data}

# The same command in every task: same --storage, same --study (the task id changes nothing).
hpsearch run \
  --storage "$HPSEARCH_STORAGE" \
  --study fashion-mlp \
  --trials 200 \
  --epochs 20 \
  --dataset fashion-mnist \
  --data-dir "$DATA_DIR" \
  --device auto
