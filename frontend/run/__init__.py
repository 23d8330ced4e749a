"""Running a request: prompts, the pipeline over the stages, each choice's decode call."""
