// Prints a Stripe-Signature header for the payload on stdin, made by Stripe's own Node
// library (webhooks.generateTestHeaderString). Usage: node sign.js <secret> [unix timestamp]
const Stripe = require("stripe");
const stripe = new Stripe("sk_test_unused");
let payload = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (payload += chunk));
process.stdin.on("end", () => {
  const options = { payload, secret: process.argv[2] };
  if (process.argv[3]) options.timestamp = Number(process.argv[3]);
  process.stdout.write(stripe.webhooks.generateTestHeaderString(options));
});
