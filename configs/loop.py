"""The whole loop in miniature (`python -m reverse_sd.loop --workdir=DIR`).

Usage:
  python -m reverse_sd.loop --workdir=DIR [--config=configs/loop.py[:tiny]]
      [--config.generator.steps=4000 ...]

`arg`: '' (default: the loop sized to about two hours on a 2-core CPU) or
'tiny' (seconds; tests). Durations are steps of each stage's own trainer.
"""

import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The loop config for `arg` in ('', 'default', 'tiny')."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The rendered corpus the autoencoder, the generator and the referee train
  # on (the synthetic grammar, one object per scene).
  config.corpus = ml_collections.ConfigDict(dict(
      seed=0, image_size=64, max_objects=1, num_train=10_000,
      num_validation=200, num_test=1_000, num_test_shifted=200))
  # MiniLM token states as the generator's context.
  config.text = ml_collections.ConfigDict(dict(
      model_dir='', context_length=40))

  # KL autoencoder: 64 px <-> 16 x 16 x 8.
  config.autoencoder = ml_collections.ConfigDict(dict(
      block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
      latent_channels=8, mid_block_attention=False, kl_weight=1e-6,
      mse_weight=1.0,
      steps=1000, batch_size=32, lr=2e-3, ema_decay=0.99,
      checkpoint_every=250, log_every=100))

  # Denoiser: the SD U-Net family at a small width, with cross-attention on
  # the prompt at 8 x 8 and 4 x 4 (shape 0.229 where 4 x 4 alone gives
  # 0.183, for 3-6 % more time a step; docs/measurements.md).
  config.generator = ml_collections.ConfigDict(dict(
      block_out_channels=(32, 64, 128),
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D',
                        'CrossAttnDownBlock2D'),
      layers_per_block=1, num_attention_heads=(2, 4, 4), norm_num_groups=8,
      schedule='scaled_linear', num_train_timesteps=1000, beta_start=0.00085,
      beta_end=0.012, context_dropout=0.1,
      # What the denoiser predicts, 'v' or 'epsilon' (the noise), and a
      # schedule rescaled to zero terminal SNR (Lin et al. 2024; needs 'v'):
      # the first sampling step starts from pure noise, so the prompt, not
      # the noise, sets the background and where the object goes
      # (`diffusion.Schedule`; docs/measurements.md).
      prediction='v', zero_terminal_snr=True,
      # Loss weights over timesteps: 'uniform' or 'min_snr' (capped at
      # `min_snr_gamma`, so the noisy steps that fix colour and layout are
      # not drowned by the nearly clean ones).
      loss_weighting='min_snr', min_snr_gamma=5.0,
      # Per-channel offset noise (`diffusion.training_noise`): the other
      # cure for a background taken from the starting noise, for a schedule
      # that keeps some signal at t = T-1; 0 with a zero terminal SNR.
      noise_offset=0.0,
      # Weight of the loss where the object is (`diffusion.object_weights`:
      # 1 + object_weight x the object's cover of the latent cell, from the
      # renderer's own masks); 0: uniform over positions. 5 gives the
      # object's cells half the loss: shape 0.282 -> 0.491, colour 0.881 ->
      # 0.915 at 4,800 steps of 32; 10 adds no shape (docs/measurements.md).
      object_weight=5.0,
      # Also condition every resnet on the prompt's sentence embedding (added
      # to the time embedding); off: cross-attention only, as SD 1.x/2.x.
      pooled_text_embedding=False,
      # Updates, not examples, are what this denoiser is short of: 9,600
      # steps of 16 beat 4,800 of 32 (shape 0.491 -> 0.545) for 5 more
      # minutes, as 4,800 of 32 beat 2,400 of 64; lr 1e-3 beats 5e-4 and
      # 2e-3 (docs/measurements.md).
      steps=9_600, batch_size=16, lr=1e-3, ema_decay=0.995,
      checkpoint_every=800, log_every=100,
      # Moves the denoiser's init and batch order (`generator.denoiser_seed`)
      # but not the corpus, autoencoder, referee or sampling noise: another
      # run of the same setting, for its run-to-run spread.
      seed=0))
  # DDIM; `eta` 0 is deterministic, 1 ancestral (fresh noise every step).
  config.sampler = ml_collections.ConfigDict(dict(
      num_steps=20, guidance_scale=4.0, eta=0.0))

  # The referee: an attribute classifier on rendered images. 2,400 steps
  # read rendered shapes and styles better than 1,200 (0.812 -> 0.892,
  # 0.838 -> 0.987) for 7 more minutes (docs/measurements.md).
  config.referee = ml_collections.ConfigDict(dict(
      steps=2400, batch_size=64, lr=2e-3, base_width=16))

  # The generated data set: the generator's images for the prompts of a
  # second synthetic build (other seed: prompts the generator never saw).
  config.generated = ml_collections.ConfigDict(dict(
      seed=1, num_train=2_500, num_validation=250, num_test=500,
      num_test_shifted=500, shard_size=250, max_objects=1))

  # Stages 5 and 6: reverse models on the generated data set, each the main
  # job (configs/synthetic.py, size `base_size`) with the loop's schedule and
  # a row's overrides ((config key, value) pairs; 'scorer_row' and
  # 'caption_row' name the row, of the same seed, that scores the curriculum
  # or captions the white-box's inputs), over `seeds`. The rows
  # train the paper's joint loss (vocabulary head at `vocab_loss_weight`)
  # unless they say otherwise; 'plain' is the ingredients' baseline.
  config.reverse = ml_collections.ConfigDict(dict(
      base_size='', num_epochs=8.0, batch_size=64,
      checkpoint_every_steps=100, vocab_loss_weight=0.1, seeds=(0, 1, 2),
      rows=(
          ('blackbox', ()),
          ('vit', (('model.backbone', 'vit'), ('model.variant', 'small'))),
          ('whitebox_empty', (('model.backbone', 'sd_unet'),)),
          ('whitebox_caption', (('model.backbone', 'sd_unet'),
                                ('model.sd_context', 'caption'),
                                ('caption_row', 'blackbox'))),
          ('plain', (('vocab.loss_weight', 0.0),)),
          ('curriculum_model', (('vocab.loss_weight', 0.0),
                                ('curriculum.difficulty', 'model'),
                                ('scorer_row', 'plain'))),
          ('curriculum_referee', (('vocab.loss_weight', 0.0),
                                  ('curriculum.difficulty', 'alignment'))),
      ),
      whitebox_rows=('blackbox', 'vit', 'whitebox_empty',
                     'whitebox_caption'),
      ingredient_rows=('plain', 'blackbox', 'curriculum_model',
                       'curriculum_referee'),
      dakl_centroids=500))

  # Stage 7: the reverse-trained encoder back in the generator.
  config.reuse = ml_collections.ConfigDict(dict(
      num_prompts=100, seeds=(0, 1, 2), steps=300, lr=3e-4, ema_decay=0.99,
      checkpoint_every=100, log_every=50, judge_epochs=3.0))

  size = arg or 'default'
  if size == 'default':
    pass
  elif size == 'tiny':
    config.corpus.update(image_size=16, num_train=64, num_validation=16,
                         num_test=16, num_test_shifted=16)
    config.text.context_length = 16
    config.autoencoder.update(block_out_channels=(8, 8), steps=4,
                              batch_size=8, checkpoint_every=2, log_every=2)
    config.generator.update(block_out_channels=(8, 16),
                            down_block_types=('DownBlock2D',
                                              'CrossAttnDownBlock2D'),
                            num_attention_heads=(1, 2), norm_num_groups=4,
                            steps=4, batch_size=8, checkpoint_every=2,
                            log_every=2)
    config.autoencoder.norm_num_groups = 4
    config.sampler.num_steps = 2
    config.referee.update(steps=4, batch_size=8)
    config.generated.update(num_train=16, num_validation=8, num_test=8,
                            num_test_shifted=8, shard_size=8)
    config.reuse.update(num_prompts=4, seeds=(0, 1), steps=2,
                        checkpoint_every=2, log_every=1, judge_epochs=1.0)
    config.reverse.update(base_size='tiny', num_epochs=1.0, batch_size=8,
                          checkpoint_every_steps=1, seeds=(0,),
                          dakl_centroids=4)
    config.reverse.rows = tuple(
        (row, (('model.backbone', 'vit'), ('model.variant', 'tiny')))
        if row == 'vit' else (row, pairs)
        for row, pairs in config.reverse.rows)
  else:
    raise ValueError(f"configs/loop.py: unknown size {arg!r}; expected '', "
                     "'default' or 'tiny'.")
  config.lock()
  return config
