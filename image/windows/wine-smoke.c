/* Smoke test of the Windows llama.cpp build under wine (run by hand; see /work/notes/14-windows.md):
 * loads one CPU variant by absolute path the way local_models/cpu_backend.py does on Linux, then the tiny
 * GGUF (local_models/tiny.py), and greedily decodes a few tokens.
 *
 *   x86_64-w64-mingw32-gcc-posix -O1 -I<llama.cpp>/include -I<llama.cpp>/ggml/include wine-smoke.c \
 *       -o wine-smoke.exe -L<dir with llama.dll, ggml.dll> -lllama -lggml
 *   wine wine-smoke.exe <dir>\ggml-cpu-haswell.dll tiny.gguf
 */
#include <stdio.h>
#include <string.h>
#include "ggml-backend.h"
#include "llama.h"

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: wine-smoke VARIANT.dll MODEL.gguf\n"); return 2; }
    if (ggml_backend_load(argv[1]) == NULL) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    llama_backend_init();
    struct llama_model *model = llama_model_load_from_file(argv[2], llama_model_default_params());
    if (model == NULL) { fprintf(stderr, "cannot load the model\n"); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256; cp.n_batch = 64; cp.n_threads = 2;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) { fprintf(stderr, "cannot create a context\n"); return 1; }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const char *prompt = "Hello, the patient";
    llama_token tokens[64];
    int n = llama_tokenize(vocab, prompt, (int)strlen(prompt), tokens, 64, true, false);
    if (n < 0) { fprintf(stderr, "tokenize failed\n"); return 1; }
    struct llama_sampler *smpl = llama_sampler_chain_init(llama_sampler_chain_default_params());
    llama_sampler_chain_add(smpl, llama_sampler_init_greedy());
    struct llama_batch batch = llama_batch_get_one(tokens, n);
    printf("prompt tokens: %d\noutput:", n);
    for (int i = 0; i < 8; i++) {
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
        llama_token t = llama_sampler_sample(smpl, ctx, -1);
        char piece[64];
        int len = llama_token_to_piece(vocab, t, piece, sizeof piece, 0, false);
        printf(" [%d]%.*s", t, len > 0 ? len : 0, piece);
        batch = llama_batch_get_one(&t, 1);
    }
    printf("\nok\n");
    llama_sampler_free(smpl);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
