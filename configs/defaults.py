"""Every configuration key of the project, with its default and the reason for it.

Keys keep the official CLIP-ReID names so that its YAML files load unchanged. Defaults follow the
official person ViT-B/16 CLIP-ReID recipe (``configs/person/vit_clipreid.yml`` of the paper), so a
YAML only has to say what differs. ``get_cfg_defaults()`` returns a fresh clone; nothing imports a
global config. Loading, legacy translation and validation live in ``configs/config.py``.
"""

from __future__ import annotations

from yacs.config import CfgNode as CN

_C = CN()

# ----------------------------------------------------------------------------------------------
# MODEL
# ----------------------------------------------------------------------------------------------
_C.MODEL = CN()
# Where to run: 'auto' takes CUDA when present, else CPU; or 'cpu', 'cuda', 'cuda:N'.
_C.MODEL.DEVICE = "auto"
# Backbone: 'ViT-B-16' or 'RN50' (the paper's two); tiny '*-test' variants exist for tests/demo.
_C.MODEL.NAME = "ViT-B-16"
# 'clipreid' (two stages), 'clipreid_one_stage' (paper Tab. 5), 'baseline' (image encoder only),
# 'pcl' (PCL-CLIP, Li & Gong 2023: one stage, image encoder only, centroid memory bank).
_C.MODEL.METHOD = "clipreid"
# Local CLIP weights (OpenAI TorchScript archive or state dict); '' downloads PRETRAIN_TAG.
_C.MODEL.PRETRAIN_PATH = ""
# open_clip pretrained tag when PRETRAIN_PATH is empty: 'openai' (the paper's); 'none' = random.
_C.MODEL.PRETRAIN_TAG = "openai"
# ViT patch-embedding stride (H, W); [12, 12] gives the paper's overlapping patches (OLP).
_C.MODEL.STRIDE_SIZE = [16, 16]
# Side-information embedding of the camera id (paper: SIE).
_C.MODEL.SIE_CAMERA = False
# Side-information embedding of the viewpoint id (VeRi-776 only has viewpoint labels).
_C.MODEL.SIE_VIEW = False
# Scale of the SIE vector; the official README uses 1.0 for SIE+OLP, 3.0 is TransReID's default.
_C.MODEL.SIE_COE = 3.0
# Where SIE is added: 'cls' (CLS token only, the paper's choice) or 'all' tokens (Tab. 7 SIE-all).
_C.MODEL.SIE_MODE = "cls"
# Prompt template; {ctx} becomes PROMPT_N_CTX learnable 'X' tokens, {cls} the class word.
_C.MODEL.PROMPT_TEMPLATE = "A photo of a {ctx} {cls}."
# Class word of the prompt; '' picks 'vehicle' for vehicle datasets and 'person' otherwise.
_C.MODEL.PROMPT_CLASS = ""
# Number M of learnable ID-specific tokens; the paper finds 4 best (1 too few, 8 redundant).
_C.MODEL.PROMPT_N_CTX = 4
# Weight of the ID (classification) losses; ViT recipes use 0.25, CNN recipes 1.0.
_C.MODEL.ID_LOSS_WEIGHT = 0.25
# Weight of the triplet losses (on the 11th-block/layer3, final and projected features).
_C.MODEL.TRIPLET_LOSS_WEIGHT = 1.0
# Weight of the stage-2 image-to-text losses.
_C.MODEL.I2T_LOSS_WEIGHT = 1.0
# Label smoothing on the ID and image-to-text cross-entropies (legacy 'on'/'off' accepted).
_C.MODEL.IF_LABELSMOOTH = True
# Label-smoothing epsilon; 0.1 as the official code hard-codes.
_C.MODEL.LABEL_SMOOTH_EPS = 0.1
# Soft-margin triplet instead of the margin ranking form.
_C.MODEL.NO_MARGIN = False
# Temperature of the contrastive losses on raw dot products; 1.0 as the official code.
_C.MODEL.TEMPERATURE = 1.0
# Weight of the PCL-CLIP prototypical contrastive loss (MODEL.METHOD 'pcl'); 1.0 as the paper.
_C.MODEL.PCL_LOSS_WEIGHT = 1.0
# Temperature of the PCL loss on cosine logits; 0.05 is hard-coded in the official PCL-CLIP code.
_C.MODEL.PCL_TEMPERATURE = 0.05
# PCL centroid momentum m (c <- m*c + (1-m)*x_hard); 0.2 as the official PCL-CLIP config.
_C.MODEL.MEMORY_MOMENTUM = 0.2
# PCL centroid update: 'hard' (hardest instance per ID, the paper's) or 'all' (ClusterContrast).
_C.MODEL.MEMORY_UPDATE = "hard"
# Unsupervised PCL-CLIP (METHOD 'pcl'): train on DBSCAN pseudo labels re-clustered every epoch.
_C.MODEL.PCL_UNSUPERVISED = False
# DBSCAN radius on the Jaccard distance; 0 = the USL reproduction's (Market 0.5, MSMT17 0.7).
_C.MODEL.CLUSTER_EPS = 0.0
# DBSCAN min_samples (the point itself included); 4 as ClusterContrast.
_C.MODEL.CLUSTER_MIN_SAMPLES = 4
# k1 of the clustering Jaccard distance (k-reciprocal neighbourhood); 30 as ClusterContrast.
_C.MODEL.CLUSTER_K1 = 30
# k2 of the clustering Jaccard distance (local query expansion); 6 as ClusterContrast.
_C.MODEL.CLUSTER_K2 = 6
# Jaccard neighbour lists: 'clustercontrast' (k1 nearest, self included; USL) or 'reranking' (k1+1).
_C.MODEL.CLUSTER_JACCARD = "clustercontrast"
# Camera-aware proxies: one pseudo label per (cluster, camera), as CAP/O2CAP; off in the recipes.
_C.MODEL.CLUSTER_CAMERA_PROXIES = False
# Freeze the ViT patch embedding (conv1), the MoCo v3 stability trick PCL-CLIP uses; ViT only.
_C.MODEL.FREEZE_PATCH_EMBED = False
# Mixed precision on CUDA: 'fp16' (with a grad scaler, official), 'bf16' or 'fp32'. CPU runs fp32.
_C.MODEL.AMP_DTYPE = "fp16"
# Recompute image-encoder activations in the backward pass: less memory, ~30% more time.
_C.MODEL.GRAD_CHECKPOINTING = False
# Training compiles the image encoder (torch.compile): faster steps after minutes of compiling.
_C.MODEL.COMPILE = False
# Channels-last (NHWC) image-encoder weights and inputs: faster RN50 convolutions on GPUs.
_C.MODEL.CHANNELS_LAST = False
# TF32 tensor-core matmuls and convolutions on CUDA for fp32 runs (Ampere and newer): about 8x the
# fp32 matmul rate with a 10-bit mantissa, which ReID training does not notice; no effect elsewhere.
_C.MODEL.TF32 = True

# ----------------------------------------------------------------------------------------------
# INPUT
# ----------------------------------------------------------------------------------------------
_C.INPUT = CN()
# Train image size (H, W); also fixes the ViT token grid. Person 256x128, vehicles 256x256.
_C.INPUT.SIZE_TRAIN = [256, 128]
# Test image size (H, W); must give the same token grid as SIZE_TRAIN.
_C.INPUT.SIZE_TEST = [256, 128]
# Horizontal flip probability.
_C.INPUT.PROB = 0.5
# Random erasing probability (per-pixel noise boxes, as the official timm settings).
_C.INPUT.RE_PROB = 0.5
# Erasing: 'pixel' (timm noise, CLIP-ReID) or 'constant' (Zhong's PIXEL_MEAN fill, PCL-CLIP).
_C.INPUT.RE_MODE = "pixel"
# Test resize: 'bilinear' (CLIP-ReID's) or 'bicubic' (PCL-CLIP's); the train resize is bicubic.
_C.INPUT.TEST_INTERPOLATION = "bilinear"
# Zero padding before the random crop.
_C.INPUT.PADDING = 10
# Normalisation mean; the official ViT recipes use 0.5, the CNN recipes ImageNet's.
_C.INPUT.PIXEL_MEAN = [0.5, 0.5, 0.5]
# Normalisation std; see PIXEL_MEAN.
_C.INPUT.PIXEL_STD = [0.5, 0.5, 0.5]

# ----------------------------------------------------------------------------------------------
# DATASETS
# ----------------------------------------------------------------------------------------------
_C.DATASETS = CN()
# Dataset name(s); a list trains on their union (disjoint pid ranges) and tests on the first.
_C.DATASETS.NAMES = ["market1501"]
# Test sets, each evaluated on its own (cross-domain: not in NAMES); [] = the first of NAMES.
_C.DATASETS.TEST_NAMES = []
# Folder that holds the dataset folders (e.g. ROOT_DIR/Market-1501-v15.09.15).
_C.DATASETS.ROOT_DIR = "data"
# CSV/TSV list for the 'csv' dataset: columns path, pid[, camid][, viewid], split.
_C.DATASETS.LIST_FILE = ""
# VehicleID test list: 800, 1600 or 2400 identities (the paper reports 800).
_C.DATASETS.VEHICLEID_TEST_SIZE = 800
# VeRi: drop images without a viewpoint label as the official code does (changes the test set).
_C.DATASETS.VERI_DROP_UNLABELED = False
# Folder of VeRi's keypoint_train.txt / keypoint_test.txt (viewpoints); '' = the VeRi folder.
_C.DATASETS.VERI_KEYPOINT_DIR = ""
# Skip unreadable images (counted in a warning) instead of stopping with the file's name.
_C.DATASETS.SKIP_CORRUPT = False
_C.DATASETS.SYNTHETIC = CN()
# Synthetic dataset: number of identities (half train, half test).
_C.DATASETS.SYNTHETIC.NUM_IDS = 64
# Synthetic dataset: number of cameras.
_C.DATASETS.SYNTHETIC.NUM_CAMERAS = 4
# Synthetic dataset: images per identity and camera.
_C.DATASETS.SYNTHETIC.IMAGES_PER_ID_CAM = 3
# Synthetic dataset: image size (H, W) written to disk.
_C.DATASETS.SYNTHETIC.SIZE = [128, 64]
# Synthetic dataset: 'person' or 'vehicle' drawings.
_C.DATASETS.SYNTHETIC.MODE = "person"
# Synthetic dataset: generator seed (same seed, same bytes).
_C.DATASETS.SYNTHETIC.SEED = 0

# ----------------------------------------------------------------------------------------------
# DATALOADER
# ----------------------------------------------------------------------------------------------
_C.DATALOADER = CN()
# Loader worker processes per loader.
_C.DATALOADER.NUM_WORKERS = 8
# 'softmax_triplet': P x K identity batches (every official YAML); 'softmax': shuffled, no triplet.
_C.DATALOADER.SAMPLER = "softmax_triplet"
# K images per identity in a P x K batch.
_C.DATALOADER.NUM_INSTANCE = 4
# Batches per stage-2 epoch, restarting the sampler when it runs out (PCL-CLIP: 200); 0 = one pass.
_C.DATALOADER.ITERS_PER_EPOCH = 0
# P x K with an identity's K images from other cameras than its anchor's (ClusterContrast, USL).
_C.DATALOADER.CAMERA_AWARE = False

# ----------------------------------------------------------------------------------------------
# SOLVER
# ----------------------------------------------------------------------------------------------
_C.SOLVER = CN()
# Seed of every random generator (python, numpy, torch, samplers, workers).
_C.SOLVER.SEED = 1234
# Triplet margin (both stages).
_C.SOLVER.MARGIN = 0.3
# A non-finite loss or gradient: 'stop' the run at once (no checkpoint of the broken weights is
# written) or 'skip' the step; stop is the default because divergence is almost always a bug or a
# learning rate too high, and skipping hides it.
_C.SOLVER.NONFINITE = "stop"
# With NONFINITE 'skip': stop after this many non-finite steps in a row (a run that cannot recover).
_C.SOLVER.NONFINITE_MAX_SKIPS = 10
# Resume from a checkpoint: a path, or 'auto' for OUTPUT_DIR/last.pth; '' starts fresh.
_C.SOLVER.RESUME = ""

_C.SOLVER.STAGE1 = CN()
# Stage-1 batch (cached features per step, and the extraction batch).
_C.SOLVER.STAGE1.IMS_PER_BATCH = 64
# Stage-1 optimizer: 'Adam', 'AdamW' or 'SGD'.
_C.SOLVER.STAGE1.OPTIMIZER_NAME = "Adam"
# Stage-1 epochs (also the cosine period); 120 for person ViT, 60 elsewhere.
_C.SOLVER.STAGE1.MAX_EPOCHS = 120
# Stage-1 peak learning rate.
_C.SOLVER.STAGE1.BASE_LR = 3.5e-4
# SGD momentum (stage 1).
_C.SOLVER.STAGE1.MOMENTUM = 0.9
# Stage-1 weight decay (coupled L2 with Adam, as the official code).
_C.SOLVER.STAGE1.WEIGHT_DECAY = 1e-4
# Linear warmup length in epochs.
_C.SOLVER.STAGE1.WARMUP_EPOCHS = 5
# Learning rate at the start of the warmup.
_C.SOLVER.STAGE1.WARMUP_LR_INIT = 1e-5
# Cosine floor.
_C.SOLVER.STAGE1.LR_MIN = 1e-6
# Save a checkpoint every N stage-1 epochs (and always at the end of the stage).
_C.SOLVER.STAGE1.CHECKPOINT_PERIOD = 120
# Log every N iterations.
_C.SOLVER.STAGE1.LOG_PERIOD = 50
# 'instance': per-sample SupCon (the paper); 'average': per-ID mean features (supp. Tab. 8).
_C.SOLVER.STAGE1.MODE = "instance"

_C.SOLVER.STAGE2 = CN()
# Stage-2 batch P x K.
_C.SOLVER.STAGE2.IMS_PER_BATCH = 64
# Micro-batches per optimizer step: the IMS_PER_BATCH batch is split into this many parts, each
# forward/backward on its own, one step at the end (the paper's batch on a smaller GPU). The
# triplet loss and BatchNorm see one micro-batch; per-sample losses give the same gradient.
_C.SOLVER.STAGE2.GRAD_ACCUM_STEPS = 1
# Stage-2 optimizer: 'Adam', 'AdamW' or 'SGD'.
_C.SOLVER.STAGE2.OPTIMIZER_NAME = "Adam"
# Stage-2 epochs.
_C.SOLVER.STAGE2.MAX_EPOCHS = 60
# Stage-2 learning rate (ViT 5e-6, CNN 3.5e-4).
_C.SOLVER.STAGE2.BASE_LR = 5e-6
# Doubles the classifiers' learning rate (works here; it crashes in the official stage 2).
_C.SOLVER.STAGE2.LARGE_FC_LR = False
# Learning-rate factor of bias parameters.
_C.SOLVER.STAGE2.BIAS_LR_FACTOR = 2.0
# SGD momentum (stage 2).
_C.SOLVER.STAGE2.MOMENTUM = 0.9
# Weight decay of non-bias parameters.
_C.SOLVER.STAGE2.WEIGHT_DECAY = 1e-4
# Weight decay of bias parameters.
_C.SOLVER.STAGE2.WEIGHT_DECAY_BIAS = 1e-4
# Multi-step decay factor.
_C.SOLVER.STAGE2.GAMMA = 0.1
# Epochs at which the learning rate is multiplied by GAMMA.
_C.SOLVER.STAGE2.STEPS = [30, 50]
# Warmup start factor.
_C.SOLVER.STAGE2.WARMUP_FACTOR = 0.1
# Warmup length, counted in EPOCHS (the official scheduler steps once per epoch).
_C.SOLVER.STAGE2.WARMUP_ITERS = 10
# 'linear' or 'constant' warmup.
_C.SOLVER.STAGE2.WARMUP_METHOD = "linear"
# Save a checkpoint every N stage-2 epochs (and always at the end).
_C.SOLVER.STAGE2.CHECKPOINT_PERIOD = 60
# Log every N iterations.
_C.SOLVER.STAGE2.LOG_PERIOD = 50
# Evaluate every N epochs (and always at the end).
_C.SOLVER.STAGE2.EVAL_PERIOD = 60
# Stage-2 text losses (Tab. 6): 'i2tce' (the paper's), 'i2t', 't2i'; ignored by baseline and pcl.
_C.SOLVER.STAGE2.TEXT_LOSSES = ["i2tce"]

# ----------------------------------------------------------------------------------------------
# TEST
# ----------------------------------------------------------------------------------------------
_C.TEST = CN()
# Evaluation batch.
_C.TEST.IMS_PER_BATCH = 64
# k-reciprocal re-ranking of the distances (Zhong et al. 2017).
_C.TEST.RE_RANKING = False
# Re-ranking k1 (official processor value).
_C.TEST.RE_RANKING_K1 = 50
# Re-ranking k2 (official processor value).
_C.TEST.RE_RANKING_K2 = 15
# Re-ranking lambda: weight of the original distance.
_C.TEST.RE_RANKING_LAMBDA = 0.3
# Re-ranking in float16 as the official code (V and Jaccard; to compare with published numbers).
_C.TEST.RE_RANKING_FLOAT16 = False
# Checkpoint to evaluate with test_clipreid.py.
_C.TEST.WEIGHT = ""
# Eval feature: 'before' (pre-BN, every official YAML) or 'after' the BNNecks ('pcl': always after).
_C.TEST.NECK_FEAT = "before"
# L2-normalise eval features (legacy 'yes'/'no' accepted; 'no' really turns it off).
_C.TEST.FEAT_NORM = True
# Longest CMC curve reported.
_C.TEST.MAX_RANK = 50
# Flip test: average each image's feature with its mirror image's (fast-reid); 2x extraction.
_C.TEST.FLIP_FEAT = False
# Also report TPR at FPR 1e-4/1e-3/1e-2 over query-gallery pairs (verification ROC).
_C.TEST.ROC = False
# SIE vector for images without usable camera/view ids: 'mean' of the SIE rows, or 'none'.
_C.TEST.SIE_FALLBACK = "mean"
# Memory budget of one chunk of the query x gallery evaluation, in MB.
_C.TEST.EVAL_MEMORY_MB = 1024
# VehicleID: random gallery draws averaged (one image per identity in the gallery).
_C.TEST.VEHICLEID_TRIALS = 10
# test_clipreid.py: draw the ranked lists of this many lowest-AP queries (0: off, the usual run).
_C.TEST.VISUALIZE = 0
# Gallery images shown per drawn query (rank-10 is the usual CMC cut-off).
_C.TEST.VISUALIZE_TOPK = 10

# ----------------------------------------------------------------------------------------------
# LOG: where the metrics.jsonl records also go, and the figures drawn from them
# ----------------------------------------------------------------------------------------------
_C.LOG = CN()
# Also write every metrics.jsonl record to OUTPUT_DIR/tensorboard (needs: pip install tensorboard).
_C.LOG.TENSORBOARD = False
# Draw OUTPUT_DIR/learning_curves.png from metrics.jsonl at the end of a run (matplotlib).
_C.LOG.CURVES = True

# ----------------------------------------------------------------------------------------------
# Output folder: logs, config.yaml, metrics.jsonl, checkpoints.
_C.OUTPUT_DIR = "output"


# Keys the official code defines but never reads (or reads only to do something harmful). They
# are accepted in YAML files and on the command line, dropped, and named in one warning.
LEGACY_KEYS: dict[str, str] = {
    "MODEL.DEVICE_ID": "set CUDA_VISIBLE_DEVICES instead; it is never overridden here",
    "MODEL.LAST_STRIDE": "RN50 always uses last stride 1",
    "MODEL.PRETRAIN_CHOICE": "use MODEL.PRETRAIN_PATH / MODEL.PRETRAIN_TAG",
    "MODEL.NECK": "the BNNeck is always used",
    "MODEL.IF_WITH_CENTER": "center loss is not provided (never applied by the official code)",
    "MODEL.ID_LOSS_TYPE": "the ID loss is always (label-smoothed) softmax cross-entropy",
    "MODEL.METRIC_LOSS_TYPE": "the metric loss is the triplet loss; DATALOADER.SAMPLER switches it",
    "MODEL.DROP_PATH": "the CLIP towers have no drop-path",
    "MODEL.DROP_OUT": "the CLIP towers have no dropout",
    "MODEL.ATT_DROP_RATE": "the CLIP towers have no attention dropout",
    "MODEL.TRANSFORMER_TYPE": "the architecture is chosen by MODEL.NAME",
    "MODEL.COS_LAYER": "no cosine classifier",
    "MODEL.DIST_TRAIN": "ignored: launch with torchrun --nproc_per_node=N for data-parallel runs",
    "TEST.DIST_MAT": "distance matrices are not written",
    "TEST.EVAL": "evaluation is controlled by SOLVER.STAGE2.EVAL_PERIOD",
    "SOLVER.CENTER_LR": "center loss is not provided",
    "SOLVER.CENTER_LOSS_WEIGHT": "center loss is not provided",
    "SOLVER.STAGE1.WEIGHT_DECAY_BIAS": "stage 1 trains only the prompt tokens",
    "SOLVER.STAGE1.WARMUP_FACTOR": "stage 1 warms up from WARMUP_LR_INIT",
    "SOLVER.STAGE1.WARMUP_ITERS": "stage 1 warms up for WARMUP_EPOCHS",
    "SOLVER.STAGE1.WARMUP_METHOD": "stage 1 warmup is linear",
    "SOLVER.STAGE1.COSINE_MARGIN": "unused by the official code",
    "SOLVER.STAGE1.COSINE_SCALE": "unused by the official code",
    "SOLVER.STAGE1.EVAL_PERIOD": "stage 1 does not evaluate",
    "SOLVER.STAGE2.WARMUP_EPOCHS": "stage 2 warms up for WARMUP_ITERS epochs",
    "SOLVER.STAGE2.WARMUP_LR_INIT": "stage 2 warms up from WARMUP_FACTOR",
    "SOLVER.STAGE2.LR_MIN": "stage 2 uses multi-step decay",
    "SOLVER.STAGE2.COSINE_MARGIN": "unused by the official code",
    "SOLVER.STAGE2.COSINE_SCALE": "unused by the official code",
    "SOLVER.STAGE2.CENTER_LR": "center loss is not provided",
    "SOLVER.STAGE2.CENTER_LOSS_WEIGHT": "center loss is not provided",
}

# The official baseline YAMLs use a flat SOLVER block (one training stage); these keys are read
# as the SOLVER.STAGE2 keys of the same name, and MODEL.METHOD becomes 'baseline'.
FLAT_SOLVER_KEYS = (
    "IMS_PER_BATCH",
    "OPTIMIZER_NAME",
    "MAX_EPOCHS",
    "BASE_LR",
    "LARGE_FC_LR",
    "BIAS_LR_FACTOR",
    "MOMENTUM",
    "WEIGHT_DECAY",
    "WEIGHT_DECAY_BIAS",
    "GAMMA",
    "STEPS",
    "WARMUP_FACTOR",
    "WARMUP_ITERS",
    "WARMUP_METHOD",
    "CHECKPOINT_PERIOD",
    "LOG_PERIOD",
    "EVAL_PERIOD",
)


# The valid range of every numeric key, checked when a config is loaded (each element of a list
# key): '> a', '>= a', or an interval '[a, b]', '(a, b)', '[a, b)', '(a, b]'.
RANGES: dict[str, str] = {
    "MODEL.STRIDE_SIZE": ">= 1",
    "MODEL.SIE_COE": ">= 0",
    "MODEL.PROMPT_N_CTX": ">= 1",
    "MODEL.ID_LOSS_WEIGHT": ">= 0",
    "MODEL.TRIPLET_LOSS_WEIGHT": ">= 0",
    "MODEL.I2T_LOSS_WEIGHT": ">= 0",
    "MODEL.LABEL_SMOOTH_EPS": "[0, 1)",
    "MODEL.TEMPERATURE": "> 0",
    "MODEL.PCL_LOSS_WEIGHT": ">= 0",
    "MODEL.PCL_TEMPERATURE": "> 0",
    "MODEL.MEMORY_MOMENTUM": "[0, 1]",
    "MODEL.CLUSTER_EPS": "[0, 1)",
    "MODEL.CLUSTER_MIN_SAMPLES": ">= 1",
    "MODEL.CLUSTER_K1": ">= 1",
    "MODEL.CLUSTER_K2": ">= 1",
    "INPUT.SIZE_TRAIN": ">= 1",
    "INPUT.SIZE_TEST": ">= 1",
    "INPUT.PROB": "[0, 1]",
    "INPUT.RE_PROB": "[0, 1]",
    "INPUT.PADDING": ">= 0",
    "INPUT.PIXEL_MEAN": "[0, 1]",
    "INPUT.PIXEL_STD": "> 0",
    "DATASETS.VEHICLEID_TEST_SIZE": ">= 1",
    "DATASETS.SYNTHETIC.NUM_IDS": "[4, 9999]",
    "DATASETS.SYNTHETIC.NUM_CAMERAS": "[2, 9]",
    "DATASETS.SYNTHETIC.IMAGES_PER_ID_CAM": ">= 2",
    "DATASETS.SYNTHETIC.SIZE": ">= 16",
    "DATASETS.SYNTHETIC.SEED": ">= 0",
    "DATALOADER.NUM_WORKERS": ">= 0",
    "DATALOADER.NUM_INSTANCE": ">= 1",
    "DATALOADER.ITERS_PER_EPOCH": ">= 0",
    "SOLVER.SEED": ">= 0",
    "SOLVER.MARGIN": ">= 0",
    "SOLVER.NONFINITE_MAX_SKIPS": ">= 0",
    "SOLVER.STAGE1.IMS_PER_BATCH": ">= 1",
    "SOLVER.STAGE1.MAX_EPOCHS": ">= 0",
    "SOLVER.STAGE1.BASE_LR": "> 0",
    "SOLVER.STAGE1.MOMENTUM": "[0, 1)",
    "SOLVER.STAGE1.WEIGHT_DECAY": ">= 0",
    "SOLVER.STAGE1.WARMUP_EPOCHS": ">= 0",
    "SOLVER.STAGE1.WARMUP_LR_INIT": ">= 0",
    "SOLVER.STAGE1.LR_MIN": ">= 0",
    "SOLVER.STAGE1.CHECKPOINT_PERIOD": ">= 1",
    "SOLVER.STAGE1.LOG_PERIOD": ">= 1",
    "SOLVER.STAGE2.IMS_PER_BATCH": ">= 1",
    "SOLVER.STAGE2.GRAD_ACCUM_STEPS": ">= 1",
    "SOLVER.STAGE2.MAX_EPOCHS": ">= 0",
    "SOLVER.STAGE2.BASE_LR": "> 0",
    "SOLVER.STAGE2.BIAS_LR_FACTOR": "> 0",
    "SOLVER.STAGE2.MOMENTUM": "[0, 1)",
    "SOLVER.STAGE2.WEIGHT_DECAY": ">= 0",
    "SOLVER.STAGE2.WEIGHT_DECAY_BIAS": ">= 0",
    "SOLVER.STAGE2.GAMMA": "> 0",
    "SOLVER.STAGE2.STEPS": ">= 0",
    "SOLVER.STAGE2.WARMUP_FACTOR": "> 0",
    "SOLVER.STAGE2.WARMUP_ITERS": ">= 0",
    "SOLVER.STAGE2.CHECKPOINT_PERIOD": ">= 1",
    "SOLVER.STAGE2.LOG_PERIOD": ">= 1",
    "SOLVER.STAGE2.EVAL_PERIOD": ">= 1",
    "TEST.IMS_PER_BATCH": ">= 1",
    "TEST.RE_RANKING_K1": ">= 1",
    "TEST.RE_RANKING_K2": ">= 1",
    "TEST.RE_RANKING_LAMBDA": "[0, 1]",
    "TEST.MAX_RANK": ">= 1",
    "TEST.EVAL_MEMORY_MB": "> 0",
    "TEST.VEHICLEID_TRIALS": ">= 1",
    "TEST.VISUALIZE": ">= 0",
    "TEST.VISUALIZE_TOPK": ">= 1",
}


def get_cfg_defaults() -> CN:
    """Return a fresh, mutable copy of the default configuration.

    Returns:
        A ``yacs`` ``CfgNode`` holding every key of the project with its default.
    """
    return _C.clone()
