// CRIU's zdtm tests moved by the modes that fetch memory after the resume.
import { zdtmSuite } from '../support/zdtm.js';

zdtmSuite(['post-copy', 'auto'], 'y', 86);
