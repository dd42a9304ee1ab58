"""medct.pretrain: self-supervised pretraining of registry encoders (installed inside the medct namespace).

spark.py          SparK masked image modelling (Tian et al., ICLR 2023; nnssl's SparK3D)
contrastive.py    SimCLR and MoCo v2 on overlapping 3D crops
volume_fusion.py  Volume Fusion (MIS-FM, Wang et al. 2023)
bm_mae.py         BM-MAE multimodal masked autoencoding, any subset of modalities (Robinet et al. 2025)
reduction.py      near-duplicate slice reduction before pretraining (Wolf et al. 2024), `medct reduce`
continual.py      continual pretraining on a new domain with replay (ContinualDataModule)
base.py           what they share: the encoder card `medct export` writes, schedules (cosine, wsd)
"""
