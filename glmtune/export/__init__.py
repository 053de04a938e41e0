"""Writing glmtune models in other programs' formats (chatglm.cpp)."""
