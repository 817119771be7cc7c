"""reverse_sd: predict the prompt embedding of a Stable Diffusion image.

From Python (a notebook):

    import reverse_sd
    run = reverse_sd.load_run('runs/synthetic')
    out = run.predict(images)   # PIL images, uint8 arrays or paths
    out.embeddings, out.top_words, out.nearest_prompts
    run.metrics(), run.curves()

Importing the package changes nothing in the process (no environment
variable, allocator setting or JAX config); entry points set up the process
in their `main()`.
"""

from reverse_sd.trained_run import load_run
from reverse_sd.trained_run import Predictions
from reverse_sd.trained_run import TrainedRun

__all__ = ['load_run', 'Predictions', 'TrainedRun']
