// A chat completions upstream on Express for the PEP's tests (tests/e2e/test_openai_answers.py). Express matches
// routes case-insensitively by default, so POST /v1/Chat/Completions is served by the /v1/chat/completions route.
// Listens on 127.0.0.1 on a free port, prints "listening <port>" on stdout, and answers GET /seen with every
// request it served ({method, path, model}).
"use strict";
const express = require("express");

const app = express();
const seen = [];
app.use(express.json());

app.post("/v1/chat/completions", (req, res) => {
  const model = req.body && req.body.model;
  seen.push({ method: req.method, path: req.originalUrl, model });
  res.json({
    id: "chatcmpl-express",
    object: "chat.completion",
    created: Math.floor(Date.now() / 1000),
    model,
    choices: [
      { index: 0, message: { role: "assistant", content: "served by express", refusal: null }, finish_reason: "stop", logprobs: null },
    ],
  });
});

app.get("/seen", (req, res) => res.json(seen));

const server = app.listen(0, "127.0.0.1", () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
