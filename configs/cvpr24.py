# Challenge-scale QAT (the paper's setting, for GPUs): python train.py --config configs/cvpr24.py --stage 1 \
#     --data /data/cvpr24 --device cuda   (flags still override these names)
epochs = 10
batch_size = 8
lr = 1e-4
warmup_epochs = 1
optim = "sgd"
samples_per_modality = 0      # the balanced sampler's Ns(m) = min over modalities
calib_images = 8
eval_max_slices = 16
workers = 4
