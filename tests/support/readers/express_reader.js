'use strict';
// A real Express app with its default router (case-insensitive, not strict about a trailing slash), as an
// upstream behind the PEP. Each answer is the path Express routed on (req.path), then the route it matched.
// GET /__seen answers how many other requests arrived (never asked through the PEP); GET /tools/__query answers
// the query as qs reads it, as JSON.
// Usage: node express_reader.js PORT
const express = require('express');

const app = express();
let seen = 0;

// The query as Express 4's default (qs, the `extended` parser that Express 5 apps set to keep it) reads it.
app.set('query parser', 'extended');

app.get('/__seen', (req, res) => res.type('text/plain').send(String(seen)));
app.get('/tools/__query', (req, res) => {
  seen += 1;
  res.json(req.query);
});
app.all('/tools/admin', (req, res) => {
  seen += 1;
  res.type('text/plain').send(`${req.path}\n/tools/admin\n`);
});
app.use((req, res) => {
  seen += 1;
  res.type('text/plain').send(`${req.path}\n\n`);
});

const server = app.listen(Number(process.argv[2]), '127.0.0.1', () => process.stdout.write('listening\n'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
