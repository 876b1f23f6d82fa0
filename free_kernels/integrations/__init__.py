"""Adapters for host frameworks: the official DiT scripts (:mod:`.official`, the drop-in
``create_diffusion``) and diffusers (:mod:`.diffusers`, ``FreeDiTPipeline``).

Nothing is imported here eagerly: diffusers is an optional extra.
"""
