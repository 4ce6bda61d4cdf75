//! What is inside an adapter, model or checkpoint (the body of `adapter-inspect`).
