"""DiT (facebookresearch/DiT) as a fastrepa backbone: the SiT architecture with a learned variance.

DiT and SiT share every layer and every state-dict key (`x_embedder.proj`, `t_embedder.mlp.0/2`,
`y_embedder.embedding_table`, fixed `pos_embed`, `blocks.N.attn.qkv/proj`, `blocks.N.mlp.fc1/fc2`,
`blocks.N.adaLN_modulation.1`, `final_layer.linear/adaLN_modulation.1`) and the same initialisation; DiT
differs in what it predicts and how it is trained and sampled:
- learn_sigma: the final layer outputs 2C channels, the noise eps (first C) and the LEARNED_RANGE variance
  values (last C), so DiT-XL/2 has 675,129,632 parameters and the official `DiT-XL-2-256x256.pt` (a bare
  EMA state dict, 292 tensors) loads strict;
- it is called with the integer DDPM timestep t in [0, 1000) (as a float tensor; the timestep embedder is
  SiT's), trained by fastrepa.objectives.ddpm and sampled by fastrepa.gaussian_diffusion;
- it has no projectors unless a method adds them (REPA on DiT: `projectors.K`; SRA: `ap_head`), so the
  registry's DiT default is z_dims=[].
"""
from fastrepa.models.sit import SiT


class DiT(SiT):
    """Diffusion Transformer with learned sigma (epsilon prediction + LEARNED_RANGE variance values)."""

    prediction = "epsilon"
    learn_sigma = True

    def velocity(self, x, t, y):
        raise TypeError("a DiT predicts the noise and its variance, not a velocity: sample it with DDPM "
                        "(fastrepa.gaussian_diffusion; generate.py --mode ddpm) through model.denoise")
