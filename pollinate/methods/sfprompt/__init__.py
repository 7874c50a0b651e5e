"""SFPrompt (https://arxiv.org/abs/2407.17533): split learning with soft prompts; import its modules."""
