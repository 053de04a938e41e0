"""ChatGLM3-6B (and chatglm3-6b-32k): role tokens, tools, conversation data rules."""
