"""Run solver schedules inside other tools: a diffusers scheduler and a k-diffusion-style sampler function.

Import the submodules directly (`s3search.integrations.diffusers_scheduler` needs diffusers installed).
"""
